"""The clip window from the data, long clips kept at their own length, and what each audio model makes of them:
random crops for the classifier's training, every window averaged for its evaluation, the first window for speech."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from flows.cli import main as cli_main
from flows.data import window_line
from flows.params import DataParams
from models.ast import AST
from tasks.data import loader
from tasks.data.features import MelConfig
from tasks.data.preprocess import PrepConfig, clip_window, prep_changes, preprocess
from tasks.data.shards import ShardConfig, shard_urls, write_shards
from tasks.train.batches import (DataInfo, asr_batch, ast_batch, clip_windows, crop_start, mels, random_crops,
                                 window_starts)
from tasks.train.table import configure
from tests.helpers import item_rows, sha256_bytes, wav_bytes, write_items

AUTO = MelConfig(n_frames=None)  # the window from the data


def _audio_rows(durations, split="train", text=None) -> list[dict]:
    return [dict(modality="audio", split=split, duration_s=d, text=text, width=None, height=None) for d in durations]


# ---------------------------------------------------------------------------------------------------- the window
def test_default_window_is_p95_of_train_clips_in_whole_patches():
    durations = [i / 100 for i in range(1, 101)]  # 0.01 .. 1.00 s
    manifest = _audio_rows(durations) + _audio_rows([9.0] * 50, split="test")  # test clips do not count
    n, why = clip_window(manifest, PrepConfig(mel=AUTO))
    p95 = float(np.percentile(durations, 95))  # 0.9505 s -> 15208 samples -> 1 + 96 = 97 frames -> 112
    assert (n, why) == (112, f"p95 of 100 train clips = {p95:.2f} s")
    # exactly a multiple: 1.27 s is 127 hops, 128 frames; a tenth of a millisecond more needs a 129th -> 144
    assert clip_window(_audio_rows([1.27] * 4), PrepConfig(mel=AUTO))[0] == 128
    assert clip_window(_audio_rows([1.2701] * 4), PrepConfig(mel=AUTO))[0] == 144


def test_default_window_minimum_and_cap():
    assert clip_window(_audio_rows([0.03] * 5), PrepConfig(mel=AUTO))[0] == 16  # 4 frames -> one patch
    n, why = clip_window(_audio_rows([25.0] * 5), PrepConfig(mel=AUTO))
    assert n == 1024 and why.endswith("capped at 1024 frames")
    with pytest.raises(ValueError, match="--n-frames or --clip-seconds"):
        clip_window(_audio_rows([None] * 3), PrepConfig(mel=AUTO))


def test_n_frames_and_clip_seconds_override_the_data():
    manifest = _audio_rows([0.3] * 10)
    assert clip_window(manifest, PrepConfig(mel=MelConfig(n_frames=64))) == (64, "--n-frames 64")
    assert clip_window(manifest, PrepConfig(mel=AUTO, clip_seconds=2.0)) == (208, "--clip-seconds 2")  # 201 -> 208
    with pytest.raises(ValueError, match="--n-frames 64 and --clip-seconds 2 both"):
        PrepConfig(mel=MelConfig(n_frames=64), clip_seconds=2.0)
    with pytest.raises(ValidationError, match="--n-frames 64 and --clip-seconds 2 both set the clip window"):
        DataParams(n_frames=64, clip_seconds=2.0)
    assert DataParams(clip_seconds=2.0).n_frames is None and DataParams().clip_seconds is None
    with pytest.raises(ValidationError, match="multiple of the 16-frame mel patch; pass 32 or 48"):
        DataParams(n_frames=40)


def test_both_window_flags_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "--n-frames", "64", "--clip-seconds", "2", "--root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tessera: error: ") and "--n-frames 64 and --clip-seconds 2 both" in err, err
    assert not (tmp_path / "out").exists()


def test_run_help_lists_the_window_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["run", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--n-frames N_FRAMES" in out and "95th percentile" in out
    assert "--clip-seconds CLIP_SECONDS" in out and "instead of --n-frames" in out


# ---------------------------------------------------------------------------------------------------- preprocess
def _clip_row(i: int, seconds: float, freq: float = 440.0, split: str = "train") -> dict:
    row = item_rows(0, 1, offset=i)[0]
    payload = wav_bytes(freq, seconds)
    return {**row, "payload": payload, "sha256": sha256_bytes(payload), "nbytes": len(payload), "duration_s": seconds,
            "split": split}


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """Three train clips (0.2, 0.8 and 2.0 s) and one val clip, preprocessed with a 32-frame (0.31 s) window:
    stored at 32, 81 and 128 frames (the cap: 4 windows)."""
    tmp = tmp_path_factory.mktemp("clips")
    rows = [_clip_row(0, 0.2), _clip_row(1, 0.8), _clip_row(2, 2.0), _clip_row(3, 0.8, split="val")]
    write_items(tmp / "items.parquet", rows)
    write_shards(tmp / "items.parquet", ShardConfig(maxcount=16), tmp / "shards")
    cfg = PrepConfig(image_size=16, mel=MelConfig(n_mels=32, n_frames=32), batch_size=4, n_patches=10_000)
    record = preprocess(tmp / "shards", cfg, tmp / "prep")
    return tmp / "prep", record


def _stored(prep: Path, split: str = "train") -> dict[str, dict]:
    return {s["__key__"]: s for b in loader.batches(shard_urls(prep, "audio", split), 8, train=False) for s in b}


def test_long_clips_keep_their_frames_up_to_the_cap(long_clips):
    prep, record = long_clips
    stored = _stored(prep)
    assert {k: s["mel"].shape for k, s in stored.items()} == {
        "aud-000000": (32, 32), "aud-000001": (32, 81), "aud-000002": (32, 128)}
    assert all(s["mel"].dtype == np.float16 for s in stored.values())
    short, long = stored["aud-000000"]["mel"].astype(np.float32), stored["aud-000001"]["mel"].astype(np.float32)
    assert short[:, 28:].max() == short.min()  # 0.2 s = 21 frames: the rest is zero padding (the log floor)
    assert long[:, 40:80].mean(0).min() > short.min() + 0.5  # 0.8 s of tone: frames 40-80 are the clip's, not padding
    stats = json.loads((prep / "stats.json").read_text())
    assert stats["audio"]["mel"]["n_frames"] == 32
    assert stats["audio"]["window"] == record["window"] == {"n_frames": 32, "seconds": 0.31, "max_frames": 128,
                                                            "why": "--n-frames 32"}


def test_changes_count_long_clips_and_cuts(long_clips):
    _, record = long_clips
    changes = record["changes"]
    assert changes["audio clips longer than the 0.31 s window: classifiers train on random 0.31 s crops and average "
                   "over the windows at evaluation"] == 3  # both 0.8 s clips and the 2.0 s one
    assert changes["transcribed audio clips longer than the 0.31 s window: cut to it for the speech models"] == 3
    assert changes["audio clips longer than 1.27 s (4 windows): cut to it"] == 1
    rows = _audio_rows([0.5, 1.27, 1.28, 3.0], text="hi") + _audio_rows([6.0])
    assert prep_changes(rows, PrepConfig()) == {  # 128 frames: 1.27 s; the cap 4 windows: 5.11 s
        "audio clips longer than the 1.27 s window: classifiers train on random 1.27 s crops and average over the "
        "windows at evaluation": 3,
        "transcribed audio clips longer than the 1.27 s window: cut to it for the speech models": 2,
        "audio clips longer than 5.11 s (4 windows): cut to it": 1}
    line = window_line(record)
    assert line == "clip window: 0.31 s (32 frames of 10 ms), --n-frames 32; longer clips kept up to 128 frames"


def test_mel_patches_take_the_grid_aligned_part(long_clips):
    prep, _ = long_clips
    patches = np.load(prep / "patches" / "mel.npy")
    assert patches.shape == (4 + 10 + 16, 16 * 16)  # 2 x 2, 2 x 5 (80 of 81 frames), 2 x 8 patches, all kept


# ---------------------------------------------------------------------------------------------------- crops, windows
def _sample(key: str, frames: int, label: int = 0, n_mels: int = 4, draw: int | None = None) -> dict:
    mel = np.tile(np.arange(frames, dtype=np.float16), (n_mels, 1))  # mel[:, t] == t: a crop shows where it starts
    s = {"__key__": key, "mel": mel, "info": {"label_id": label}}
    return s if draw is None else {**s, "draw": draw}


def test_window_starts_cover_the_clip_last_aligned_to_its_end():
    assert window_starts(300, 128) == [0, 128, 172]
    assert window_starts(256, 128) == [0, 128]
    assert window_starts(128, 128) == [0]
    with pytest.raises(ValueError, match="shorter than the 128-frame window"):
        window_starts(100, 128)


def test_random_crops_differ_across_draws_and_stay_in_the_clip(long_clips):
    starts = []
    for epoch in range(12):
        draw = loader.draw_seed(loader.epoch_seed(0, epoch), "aud-000001")
        crop = random_crops([_sample("aud-000001", 81, draw=draw)], 32)[0]  # (n_mels, 32)
        t = int(crop[0, 0])
        assert crop[0].tolist() == list(range(t, t + 32)) and 0 <= t <= 81 - 32
        starts.append(t)
    assert len(set(starts)) >= 6
    assert crop_start(32, 32, 123) == 0
    assert loader.draw_seed(5, "k") == loader.draw_seed(5, "k") != loader.draw_seed(6, "k")
    prep, _ = long_clips  # the train loader tags every sample with its draw; evaluation reads untagged
    train = [s for b in loader.batches(shard_urls(prep, "audio", "train"), 3, epoch=1) for s in b]
    assert {s["draw"] for s in train} == {loader.draw_seed(loader.epoch_seed(0, 1), s["__key__"]) for s in train}
    assert not any("draw" in s for s in _stored(prep).values())


def _ctx(n_frames: int, cfg=None) -> SimpleNamespace:
    stats = {"audio": {"classes": ["a", "b", "c"], "mel": {"n_mels": 16, "n_frames": n_frames}}}
    return SimpleNamespace(cfg=cfg, data=DataInfo(Path("."), stats))


def test_ast_batch_crops_in_training_and_gives_every_window_in_evaluation():
    ctx = _ctx(32, SimpleNamespace(n_frames=32))
    train = ast_batch([_sample("a", 81, draw=1), _sample("b", 32, draw=2)], ctx)
    assert set(train) == {"mel", "label"} and train["mel"].shape == (2, 4, 32)
    assert train["mel"][1, 0].tolist() == list(range(32))
    ev = ast_batch([_sample("a", 81, 1), _sample("b", 32, 2)], ctx)
    assert ev["clip_of"].tolist() == [0, 0, 0, 1] and ev["label"].tolist() == [1, 2]
    assert [int(w[0, 0]) for w in ev["mel"]] == [0, 32, 49, 0]
    assert "clip_of" not in ast_batch([_sample("b", 32), _sample("c", 32)], ctx)  # one window each: the batch as before


def test_eval_averages_logits_over_the_windows():
    torch.manual_seed(0)
    cfg = configure("ast", _ctx(32).data, "tiny")
    model = AST(cfg).eval()
    long = {"__key__": "a", "mel": np.random.default_rng(0).standard_normal((16, 81)).astype(np.float16),
            "info": {"label_id": 2}}
    short = {"__key__": "b", "mel": np.random.default_rng(1).standard_normal((16, 32)).astype(np.float16),
             "info": {"label_id": 0}}
    batch = ast_batch([long, short], SimpleNamespace(cfg=cfg, data=_ctx(32).data))
    with torch.no_grad():
        logits, loss = model(batch)
        x = torch.from_numpy(long["mel"].astype(np.float32))
        by_hand = torch.stack([model({"mel": x[None, :, t:t + 32]})[0][0] for t in (0, 32, 49)]).mean(0)
        alone = model({"mel": torch.from_numpy(short["mel"].astype(np.float32))[None]})[0][0]
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(torch.stack([by_hand, alone]), torch.tensor([2, 0])))
    assert not torch.allclose(by_hand, model({"mel": x[None, :, :32]})[0][0])  # averaging is not the first window


def test_speech_models_read_the_first_window():
    ctx = _ctx(32, SimpleNamespace(tgt_len=8))
    batch = asr_batch([{**_sample("a", 81), "info": {"text": "hi"}}, {**_sample("b", 32), "info": {"text": "yo"}}],
                      ctx)
    assert batch["src"].shape == (2, 4, 32) and batch["src"][0, 0].tolist() == list(range(32))
    with pytest.raises(ValueError, match=r"clips of \[32, 81\] frames: pass n_frames"):
        mels([_sample("a", 81), _sample("b", 32)])
    w, clip = clip_windows([_sample("a", 64)], 32)
    assert w.shape == (2, 4, 32) and clip.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------- the models
@pytest.mark.parametrize("n_frames", [32, 64, 128])
def test_ast_positional_table_follows_the_window(n_frames):
    cfg = configure("ast", _ctx(n_frames).data, "tiny")
    assert cfg.n_frames == n_frames
    assert AST(cfg).encoder.pos_embed.shape[1] == 1 + (16 // 16) * (n_frames // 16)


def test_asr_and_tts_configs_read_the_window():
    for n_frames in (32, 64):
        data = _ctx(n_frames).data
        assert configure("asr", data, "tiny").n_frames == n_frames
        assert configure("tts", data, "tiny").n_frames == n_frames  # it writes the window itself
