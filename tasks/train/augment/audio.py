"""Log-mel augmentation (AST, the speech recogniser): SpecAugment, shifts, the speed warp, the noise floor and the
gain; ast_augment, asr_augment and their settings AST_AUG, ASR_AUG."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.rng import generator
from tasks.train.augment.common import mixup, settings


def spec_augment(mel: torch.Tensor, freq_mask: int = 16, time_mask: int = 16, n_masks: int = 1) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape with n_masks frequency bands of up to freq_mask bins and n_masks time
    spans of up to time_mask frames set to 0 (the normalised mean) per sample."""
    B, F_, T = mel.shape
    keep = torch.ones(B, F_, T, dtype=torch.bool)
    bins, frames = torch.arange(F_)[None, :, None], torch.arange(T)[None, None, :]
    for size, n, axis in ((freq_mask, F_, bins), (time_mask, T, frames)):
        for _ in range(n_masks if size > 0 else 0):
            width = torch.randint(0, min(size, n) + 1, (B, 1, 1), generator=generator())
            start = (torch.rand(B, 1, 1, generator=generator()) * (n - width + 1)).long()
            keep &= ~((axis >= start) & (axis < start + width))
    return mel * keep


def time_shift(mel: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape, each clip rolled in time by a whole number of frames in
    [-max_shift, max_shift] (what leaves one end comes in at the other: mostly the window's padding silence)."""
    B, _, T = mel.shape
    if max_shift <= 0:
        return mel
    shift = torch.randint(-max_shift, max_shift + 1, (B, 1, 1), generator=generator())
    idx = (torch.arange(T)[None, None, :] - shift) % T  # (B, 1, T)
    return mel.gather(2, idx.expand_as(mel))


def freq_shift(mel: torch.Tensor, max_shift: float) -> torch.Tensor:
    """(B, n_mels, n_frames) -> same shape, each clip moved along the mel axis by a shift in [-max_shift, max_shift]
    bins (fractional: linear interpolation; edge bins repeated). On a mel scale a formant scale change is close to a
    shift, so this is a cheap vocal-tract-length perturbation (Jaitly and Hinton 2013)."""
    B, F_, _ = mel.shape
    if max_shift <= 0:
        return mel
    shift = (torch.rand(B, 1, generator=generator()) * 2 - 1) * max_shift  # (B, 1)
    src = torch.arange(F_, dtype=mel.dtype)[None, :] - shift  # (B, F)
    src = src.clamp(0, F_ - 1)
    lo = src.floor().long().clamp(max=F_ - 2) if F_ > 1 else src.floor().long()
    hi = (lo + 1).clamp(max=F_ - 1)
    w = (src - lo.to(mel.dtype))[:, :, None]  # (B, F, 1)
    take = lambda i: mel.gather(1, i[:, :, None].expand_as(mel))  # noqa: E731
    return (1 - w) * take(lo) + w * take(hi)


def slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    """Hz -> the Slaney mel scale the features use (tasks/data/features.py): linear below 1 kHz, log above."""
    log_step = math.log(6.4) / 27.0
    return torch.where(hz < 1000, hz * 3 / 200, 15 + torch.log(hz.clamp(min=1e-6) / 1000) / log_step)


def slaney_hz(mel: torch.Tensor) -> torch.Tensor:
    """slaney_mel's inverse."""
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15, mel * 200 / 3, 1000 * torch.exp((mel - 15) * log_step))


def warp_mel(mel: torch.Tensor, warp: torch.Tensor, stretch: torch.Tensor, sample_rate: int, f_min: float = 0.0
             ) -> torch.Tensor:
    """(B, n_mels, n_frames) log-mel, factors (B,) -> same shape: clip i with every frequency scaled by warp[i] (the
    content at f moves to warp x f, through the bands' centre frequencies on the Slaney mel scale) and time by
    stretch[i] (frame t comes from t / stretch), about the start, by linear interpolation; what would come from
    beyond the clip or the top band repeats the edge."""
    B, F_, T = mel.shape
    top = slaney_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64))
    low = slaney_mel(torch.tensor(float(f_min), dtype=torch.float64))
    centres = slaney_hz(low + (top - low) * torch.arange(1, F_ + 1, dtype=torch.float64) / (F_ + 1))  # (F,) Hz
    warp, stretch = warp.to(torch.float64)[:, None], stretch.to(torch.float64)[:, None]  # (B, 1)
    src_bin = (slaney_mel(centres[None, :] / warp) - low) / (top - low) * (F_ + 1) - 1  # (B, F) fractional bins
    src_frame = torch.arange(T, dtype=torch.float64)[None, :] / stretch  # (B, T)
    grid = torch.stack(torch.broadcast_tensors(
        (src_frame / max(T - 1, 1) * 2 - 1)[:, None, :],  # x: time
        (src_bin / max(F_ - 1, 1) * 2 - 1)[:, :, None]), -1)  # y: band -> (B, F, T, 2)
    out = F.grid_sample(mel[:, None], grid.to(mel.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[:, 0]


def speed_warp(mel: torch.Tensor, max_warp: float, max_stretch: float, sample_rate: int, f_min: float = 0.0
               ) -> torch.Tensor:
    """warp_mel with factors uniform in 1 +- max_warp (vocal-tract-length perturbation, Jaitly and Hinton 2013: a
    shorter or longer vocal tract scales the formants) and 1 +- max_stretch (the tempo half of Kaldi's speed
    perturbation), one pair per clip."""
    if max_warp <= 0 and max_stretch <= 0:
        return mel
    warp, stretch = 1 + (torch.rand(2, len(mel), dtype=torch.float64, generator=generator()) * 2 - 1) * torch.tensor(
        [[max_warp], [max_stretch]], dtype=torch.float64)
    return warp_mel(mel, warp, stretch, sample_rate, f_min)


def noise_floor(mel: torch.Tensor, drop: tuple[float, float], std: float, p: float = 0.5, tilt: float = 0.0
                ) -> torch.Tensor:
    """(B, n_mels, n_frames) normalised log-mel -> same shape, a share p of the clips with flat (white) noise added in
    power under them: its level is the clip's loudest bin minus a drop uniform in `drop` (in units of the data's
    log-mel std, `std` nats each), added as power (log-add-exp), so quiet bins rise to the floor and loud ones stay:
    recordings differ in background noise and room as much as in level."""
    lo, hi = drop
    if p <= 0:
        return mel
    B, F_, _ = mel.shape
    drop_by = lo + torch.rand(B, 1, 1, dtype=mel.dtype, generator=generator()) * (hi - lo)  # (B, 1, 1)
    level = mel.amax((1, 2), keepdim=True) - drop_by  # (B, 1, 1)
    if tilt > 0:  # noise rising towards the top band by up to `tilt` std: a recording whose high bands drown first
        ramp = torch.linspace(0, 1, F_, dtype=mel.dtype)[None, :, None]  # (1, F, 1)
        level = level + torch.rand(B, 1, 1, dtype=mel.dtype, generator=generator()) * tilt * ramp  # (B, F, 1)
    noisy = torch.logaddexp(mel * std, level * std) / std
    return torch.where((torch.rand(B, generator=generator()) < p)[:, None, None], noisy, mel)


def band_limit(mel: torch.Tensor, p: float, lowest: float = 0.5) -> torch.Tensor:
    """(B, n_mels, n_frames) log-mel -> same shape, a share p of the clips with every band above a cutoff (a share of
    the bands uniform in [lowest, 1]) drowned: held at that band's own quiet level in the clip (its 10% quantile over
    the frames), as in a recording whose high bands sink into its noise (a cheap microphone, a distant speaker)."""
    if p <= 0:
        return mel
    B, F_, _ = mel.shape
    cut = (lowest + torch.rand(B, 1, 1, generator=generator()) * (1 - lowest)) * F_  # (B, 1, 1) the first drowned band
    quiet = mel.float().quantile(0.1, dim=2, keepdim=True).to(mel.dtype)  # (B, F, 1)
    drowned = (torch.arange(F_)[None, :, None] >= cut) & (torch.rand(B, 1, 1, generator=generator()) < p)  # (B, F, 1)
    return torch.where(drowned, quiet.expand_as(mel), mel)


def random_gain(mel: torch.Tensor, max_offset: float) -> torch.Tensor:
    """(B, n_mels, n_frames) normalised log-mel -> same shape, each clip moved by one offset uniform in
    [-max_offset, max_offset]: in log power a recording's level (microphone, distance, speaker) is an added constant,
    here in units of the data's log-mel std, so an offset d is a gain of d x std nats of power."""
    if max_offset <= 0:
        return mel
    return mel + (torch.rand(len(mel), 1, 1, dtype=mel.dtype, generator=generator()) * 2 - 1) * max_offset


# noise_floor's level under the clip's loudest bin, in std units of the data's log-mel (the `floor_drop` setting).
# fsdd4's nicolas records with his quiet frames 1.5 std under his loudest bin (median; the others 1.6-2.0), so lower
# floors were tried (2026-12-02, Intel AMX, seed 0, both models; AST / CER): 1.0-3.0 jackson 0.746 / 0.195, nicolas
# 0.708 / 0.371; 0.75-2.5 nicolas 0.666 / 0.422; against 0.824 / 0.228 and 0.700 / 0.291 at 1.5-3.5. His high bands'
# speech is 1-2 nats above his noise (the others' 3-7), so a floor rising towards the top band by up to 1 std
# (`floor_tilt` 1.0) was tried on all four (jackson / nicolas / theo / yweweler): AST 0.766 / 0.746 / 0.872 / 0.888
# (mean 0.818 against 0.839), CER 0.256 / 0.383 / 0.070 / 0.115 (mean 0.206 against 0.196): off. Half the clips
# band-limited instead (`band_limit` 0.5, seed 0): AST 0.526 / 0.606 / 0.840 / 0.918 (mean 0.723), CER 0.376 / 0.299 /
# 0.134 / 0.215 (mean 0.256): off. The defaults at seed 1: AST 0.844 / 0.588 / 0.902 / 0.916, CER 0.267 / 0.440 /
# 0.081 / 0.116.
FLOOR_DROP = (1.5, 3.5)


def speaker_and_room(mel: torch.Tensor, a: dict, ctx) -> torch.Tensor:
    """What both speech models share: the speed warp, the noise floor (under a share `floor` of the clips, `floor_drop`
    std under each one's loudest bin) and the gain of settings `a`, in that order;
    the features' sample rate, lowest frequency and log-mel std come from the prepared data's stats (ctx.data)."""
    if a["warp"] > 0 or a["stretch"] > 0:
        feat = ctx.data.modality("audio")["mel"]
        mel = speed_warp(mel, a["warp"], a["stretch"], int(feat["sample_rate"]), float(feat.get("f_min", 0.0)))
    if a["floor"] > 0:
        mel = noise_floor(mel, tuple(a["floor_drop"]), float(ctx.data.modality("audio")["std"]), a["floor"],
                          a["floor_tilt"])
    mel = band_limit(mel, a["band_limit"])
    return random_gain(mel, a["gain"])


def asr_augment(batch, ctx, given: bool | dict | None = None):
    a = settings(ASR_AUG, given)
    src = speaker_and_room(batch["src"], a, ctx)
    return {**batch, "src": spec_augment(src, freq_mask=a["freq_mask"], time_mask=a["time_mask"])}


def ast_augment(batch, ctx, given: bool | dict | None = None):
    a = settings(AST_AUG, given)
    mel = time_shift(batch["mel"], a["time_shift"])
    mel = speaker_and_room(freq_shift(mel, a["freq_shift"]), a, ctx)
    mel = spec_augment(mel, freq_mask=a["freq_mask"], time_mask=a["time_mask"])
    mel, target = mixup(mel, batch["label"], ctx.cfg.n_classes, a["mixup"])
    return {**batch, "mel": mel, "label": target}


# Speech recognition's SpecAugment masks, test word accuracy (transcript exactly right): spoken digits of a speaker
# never heard in training (fsdd4, theo held out, default model and budget, 449 steps) 0.91 without, 0.93 with 16 bins
# / 8 frames; 10 takes a speaker and digit (272 train clips, 340 steps) 0.48 without, 0.66 with 8 / 4, 0.77 with
# 16 / 8. The built-in set at its 250 steps: CER 0.026 without, 0.075 with 8 / 4, 0.204 with 16 / 8 (the masks slow a
# short run down), so they are off by default.
# A random gain of +-0.5 std per clip (`gain`, on): built-in CER 0.026 -> 0.019; fsdd4, nicolas held out (the speaker no
# model reached the baseline on; LR 0.42), word accuracy 0.21 -> 0.38, with the masks 16 / 8 as well 0.44. So the recipe
# for real speech is train_overrides {"asr": {"augment": {"freq_mask": 16, "time_mask": 8}}}.
# A noise floor under a quarter of the clips (`floor`, noise_floor: flat noise 1.5-3.5 std under the clip's loudest bin,
# on by default), measured on an Intel AMX machine (2026-12-02; the gain-only default there: built-in CER 0.034; fsdd4
# each speaker held out, CER jackson 0.316, nicolas 0.602, theo 0.076, yweweler 0.102): floor 0.25 built-in 0.028,
# 0.324 / 0.382 / 0.077 / 0.113 (mean 0.274 -> 0.224); floor 0.5 built-in 0.069 (slows the 250-step run), 0.300 /
# 0.341 / 0.088 / 0.117. Vocal-tract-length warp +-10% (`warp`) jackson 0.302, nicolas 0.570; with a +-10% tempo
# stretch (`stretch`) 0.283 / 0.680: off. SpecAugment 16 bins / 8 frames with the floor: jackson 0.314, nicolas 0.549.
ASR_AUG = dict(gain=0.5, warp=0.0, stretch=0.0, floor=0.25, floor_drop=FLOOR_DROP, floor_tilt=0.0, band_limit=0.0,
               freq_mask=0, time_mask=0)
# AST (before the gain, with the masks on): fsdd4, theo held out, conv stem, 717 steps, test
# accuracy without augmentation 0.68 / 0.71 (seeds 0 / 1); time shifts of up to 8 frames 0.56, mel shifts of up to 4
# bins 0.64, of 8 bins 0.54, both 0.56, both + masks of 8 bins and 8 frames 0.61: so the shifts stay at 0.
# A random gain per clip (`gain`: an offset uniform in +-0.5 std of the data's log-mel; the four fsdd4 speakers were
# recorded at levels 8x apart in RMS) is on by default, the masks off: fsdd4, frames stem, default budget (713-717
# steps), each speaker held out in turn (LR 0.50 / 0.42 / 0.614 / 0.624), without -> with the gain: jackson 0.774 ->
# 0.774, nicolas 0.36 -> 0.636, theo 0.834 -> 0.888, yweweler 0.868 -> 0.93; built-in set 1.0 -> 1.0. Gain +-1.0:
# jackson 0.784, nicolas 0.594. On nicolas: +-0.5 with mixup 0.2 0.646, mixup 0.2 alone 0.542; dropout 0.1 (no gain)
# 0.276; each band's mean over the clip removed (cepstral mean normalisation, a model change) 0.216.
# A noise floor under half the clips (`floor`, noise_floor; on by default), measured on an Intel AMX machine
# (2026-12-02), each speaker held out (jackson, nicolas, theo, yweweler), seed 0: the gain alone 0.790 / 0.634 / 0.864 /
# 0.828 (seed 1: 0.794 / 0.712 / 0.910 / 0.822) -> floor 0.5 0.804 / 0.684 / 0.880 / 0.858 (seed 1: 0.846 / 0.720 /
# 0.862 / 0.912); built-in set 1.0 -> 1.0. Also measured there (seed 0): mixup 0.2 0.772 / 0.692 / 0.900 / 0.922,
# with the floor 0.780 / 0.754 / 0.932 / 0.860; a tempo stretch of +-10% (`stretch`) 0.824 / 0.580 / 0.866 / 0.940
# (seed 1: 0.792 / 0.470 / - / -). Jackson / nicolas only: a vocal-tract-length warp of +-10% (`warp`, speed_warp)
# 0.784 / 0.508, of +-15% 0.744 / 0.484; warp and stretch +-10% 0.824 / 0.604; mel shifts of 2 bins 0.832 / 0.616, of
# 4 bins 0.788 / 0.442; time shifts of 4 frames 0.796 / 0.504; lr 2e-3 0.768 / 0.346; weight decay 0.2 0.786 / 0.626;
# warmup 100 / 10 steps (default 40) 0.740 / 0.682, 0.762 / 0.628; the model (table.py) at depth 8 (default 4) 0.730 /
# 0.526, width 256 (default 128) 0.796 / 0.678, dropout 0.1 0.860 / 0.586.
# Nicolas moves by 0.08 between seeds, so one run says little. Mixup 0.2 with the floor at seed 1: 0.840 / 0.670 /
# 0.894 / 0.824, so over both seeds 0.819 against the default's 0.821: off. Twice the epochs (34): jackson 0.738,
# nicolas 0.698. Each band's mean over the clip's loud frames removed in the stem: nicolas 0.504 (within 2 std of the
# loudest frame) / 0.264 (4 std).
AST_AUG = dict(time_shift=0, freq_shift=0.0, warp=0.0, stretch=0.0, floor=0.5, floor_drop=FLOOR_DROP, floor_tilt=0.0,
               band_limit=0.0, gain=0.5, freq_mask=0, time_mask=0, mixup=0.0)
