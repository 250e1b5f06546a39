"""Log-mel augmentation (tasks/train/augment/audio.py) for the AST and the speech recogniser: SpecAugment, shifts, the
speed warp, the noise floor, the gain; and the AST's frames stem they feed."""

import math

import pytest
import torch

from tasks.train import augment
from tasks.train.table import MODELS


def test_spec_augment_masks_at_most_the_asked_bands():
    torch.manual_seed(0)
    mel = torch.ones(32, 20, 30)
    out = augment.spec_augment(mel, freq_mask=5, time_mask=7)
    for m in out:
        zero_rows = int((m == 0).all(1).sum())  # fully masked frequency bins
        zero_cols = int((m == 0).all(0).sum())  # fully masked frames
        assert zero_rows <= 5 and zero_cols <= 7
    assert (out == 0).any()
    assert torch.equal(augment.spec_augment(mel, freq_mask=0, time_mask=0), mel)


def test_time_shift_rolls_each_clip_by_at_most_max_shift_frames():
    torch.manual_seed(0)
    mel = torch.zeros(32, 4, 20)
    mel[:, :, 10] = 1.0  # one loud frame in the middle
    out = augment.time_shift(mel, max_shift=3)
    assert out.shape == mel.shape and torch.equal(out.sum((1, 2)), mel.sum((1, 2)))  # a roll loses nothing
    frames = [int(m[0].nonzero()[0]) for m in out]
    assert all(abs(f - 10) <= 3 for f in frames) and len(set(frames)) > 1
    assert all(torch.equal(m[0], m[3]) for m in out)  # every band moves together
    assert torch.equal(augment.time_shift(mel, 0), mel)


def test_freq_shift_moves_the_mel_axis_and_keeps_the_edges():
    torch.manual_seed(0)
    ramp = torch.arange(16.0)[None, :, None].expand(64, 16, 5).contiguous()  # value = bin index
    out = augment.freq_shift(ramp, max_shift=2.5)
    inner = out[:, 4:12, 0] - ramp[:, 4:12, 0]  # away from the clamped edges a shift is the same offset everywhere
    assert torch.allclose(inner, inner[:, :1].expand_as(inner), atol=1e-5)
    assert inner.abs().max() <= 2.5 + 1e-5 and inner.std() > 0.5  # within the bound, and not one offset for all
    assert out.min() >= 0 and out.max() <= 15  # edge bins are repeated, never extrapolated
    assert torch.allclose(out[:, :, 0], out[:, :, 4])  # every frame moves together
    assert torch.equal(augment.freq_shift(ramp, 0.0), ramp)


def _audio_ctx(n_classes: int = 3):
    """What the audio augmentations read from a BatchContext: the class count and the prepared data's mel facts."""
    audio = {"std": 6.0, "mel": {"sample_rate": 8000, "f_min": 20.0}}
    data = type("Data", (), {"modality": lambda self, name: audio})()
    return type("Ctx", (), {"cfg": type("Cfg", (), {"n_classes": n_classes})(), "data": data})()


def test_ast_augment_is_reproducible_from_the_global_seed(monkeypatch):
    monkeypatch.setitem(augment.AST_AUG, "mixup", 0.2)
    monkeypatch.setitem(augment.AST_AUG, "stretch", 0.1)
    ctx = _audio_ctx()
    batch = {"mel": torch.randn(6, 12, 16), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    torch.manual_seed(3)
    a = augment.ast_augment(batch, ctx)
    torch.manual_seed(3)
    b = augment.ast_augment(batch, ctx)
    assert torch.equal(a["mel"], b["mel"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["mel"], batch["mel"]) and a["label"].shape == (6, 3)


def test_the_speech_recogniser_masks_its_source_only():
    torch.manual_seed(0)
    batch = {"src": torch.ones(8, 12, 20), "tgt": torch.arange(16).view(8, 2)}
    out = MODELS["asr"].augment(batch, _audio_ctx(), {"freq_mask": 4, "time_mask": 4})  # a run's (TrainConfig.augment)
    assert torch.equal(out["tgt"], batch["tgt"]) and (out["src"] == 0).any() and out["src"].shape == (8, 12, 20)
    defaults = MODELS["asr"].augment(batch, _audio_ctx(), {"gain": 0.0})["src"]
    assert not (defaults == 0).any()  # the defaults mask nothing


def test_random_gain_moves_each_clip_by_one_offset():
    torch.manual_seed(0)
    mel = torch.randn(64, 12, 20)
    moved = augment.random_gain(mel, 0.5) - mel  # (B, n_mels, T)
    per_clip = moved[:, :1, :1]
    assert torch.allclose(moved, per_clip.expand_as(moved), atol=1e-6)  # one level a clip, every bin and frame
    assert per_clip.abs().max() <= 0.5 and per_clip.std() > 0.2  # spread over +-0.5, not one offset for all
    assert torch.equal(augment.random_gain(mel, 0.0), mel)


def test_the_ast_frames_stem_makes_one_token_per_two_frames_of_every_band():
    from models.ast import AST, ASTConfig

    torch.manual_seed(0)
    net = AST(ASTConfig(n_mels=16, n_frames=24, n_classes=3, dim=32, depth=1, n_heads=2, stem="frames")).eval()
    mel = torch.randn(2, 16, 24)
    assert net.forward_features(mel).shape == (2, 1 + 12, 32)
    bumped = mel.clone()
    bumped[:, 15, 23] += 5.0  # the top band of the last frame reaches the output through the full-band stem
    assert not torch.allclose(net(dict(mel=mel))[0], net(dict(mel=bumped))[0])
    assert net.flops_per_sample() > 0
    with pytest.raises(ValueError, match="longer"):
        net.forward_features(torch.randn(1, 16, 30))


def test_warp_mel_moves_a_tone_to_the_scaled_frequency_and_stretches_time():
    from tasks.data.features import MelConfig, log_mel

    cfg = MelConfig(sample_rate=8000, n_frames=40)
    t = torch.arange(cfg.n_samples) / 8000
    tone = lambda hz: log_mel([(0.3 * torch.sin(2 * math.pi * hz * t)).numpy()], cfg)  # noqa: E731 (1, 128, 40)
    for hz in (700.0, 2000.0):  # below and above the Slaney scale's 1 kHz knee
        warped = augment.warp_mel(tone(hz), torch.tensor([1.1]), torch.tensor([1.0]), 8000, cfg.f_min)
        peak = warped[0, :, 20].argmax().item()
        assert abs(peak - tone(hz * 1.1)[0, :, 20].argmax().item()) <= 1
        assert abs(peak - tone(hz)[0, :, 20].argmax().item()) >= 4
    ramp = torch.arange(10.0)[None, None, :].expand(2, 3, 10)  # frame t holds t
    slow = augment.warp_mel(ramp, torch.ones(2), torch.tensor([2.0, 1.0]), 8000)
    assert torch.allclose(slow[0, 0], torch.arange(10.0) / 2) and torch.allclose(slow[1], ramp[1])
    assert torch.equal(augment.speed_warp(ramp, 0.0, 0.0, 8000), ramp)
    torch.manual_seed(0)
    assert augment.speed_warp(tone(700.0), 0.1, 0.1, 8000).shape == (1, 128, 40)


def test_noise_floor_raises_quiet_bins_to_a_level_under_each_clips_peak():
    torch.manual_seed(0)
    mel = torch.randn(8, 16, 20)
    out = augment.noise_floor(mel, (1.0, 2.0), std=6.0, p=1.0)
    peak = mel.amax((1, 2))
    assert (out >= mel).all() and torch.allclose(out.amax((1, 2)), peak, atol=0.01)  # loud bins stay
    assert (out.amin((1, 2)) >= peak - 2.0).all() and (out.amin((1, 2)) <= peak - 1.0 + 0.2).all()
    assert torch.equal(augment.noise_floor(mel, (1.0, 2.0), std=6.0, p=0.0), mel)
    some = augment.noise_floor(mel, (1.0, 2.0), std=6.0, p=0.5)
    changed = (some != mel).flatten(1).any(1)
    assert 0 < changed.sum() < 8  # a share of the clips, each whole or not at all


def test_a_tilted_noise_floor_rises_towards_the_top_band():
    """floor_tilt: the floor's level climbs by up to `tilt` std from the lowest band to the highest (a recording whose
    high bands drown first); without it every band gets the same level."""
    torch.manual_seed(0)
    mel = torch.full((64, 16, 20), -10.0)
    mel[:, 0, 0] = 0.0  # the clip's peak
    flat = augment.noise_floor(mel, (2.0, 2.0), std=1.0, p=1.0)
    tilted = augment.noise_floor(mel, (2.0, 2.0), std=1.0, p=1.0, tilt=2.0)
    assert torch.allclose(flat[:, 1], flat[:, -1], atol=1e-5)
    rise = (tilted[:, -1] - tilted[:, 1]).mean()
    assert 0.7 < rise < 1.3  # uniform in [0, 2] std at the top band: 1 on average
    assert torch.allclose(tilted[:, 0, 0], flat[:, 0, 0])  # the lowest band gets the untilted level


def test_band_limit_drowns_the_bands_above_a_cutoff_in_their_own_quiet_level():
    """band_limit: above a cutoff in the top half of the bands, each band is held at its own 10% quantile over the
    clip's frames (its noise); the bands below keep every value; p=0 leaves the clip as it was."""
    torch.manual_seed(0)
    mel = torch.randn(64, 16, 40)
    out = augment.band_limit(mel, p=1.0, lowest=0.5)
    quiet = mel.quantile(0.1, dim=2, keepdim=True).expand_as(mel)
    cuts = []
    for m, q, o in zip(mel, quiet, out):
        drowned = (o == q).all(1) & ~(o == m).all(1)  # (F,) bands held at their quiet level
        first = int(drowned.float().argmax()) if drowned.any() else 16  # a cutoff past the top band drowns none
        assert first >= 8 and drowned[first:].all()  # a cutoff in the top half, every band above it
        assert torch.equal(o[:first], m[:first])
        cuts.append(first)
    assert len(set(cuts)) > 3 and sum(c < 16 for c in cuts) > 48  # the cutoff varies; most clips lose some bands
    assert torch.equal(augment.band_limit(mel, p=0.0), mel)
    some = augment.band_limit(mel, p=0.5)
    kept = sum(torch.equal(a, b) for a, b in zip(some, mel))
    assert 16 < kept < 48  # about half the clips untouched
