"""The built-in dataset (tasks/data/builtin/synthetic.py) and eSpeak NG speech (tasks/data/builtin/speech.py): tiny sizes, no timing asserts."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tasks.data.builtin import speech
from tasks.data.builtin import synthetic
from tasks.data.builtin.synthetic import BACKGROUNDS, COLOURS, HELDOUT, SHAPES, SyntheticConfig

TINY = SyntheticConfig(n_images=24, n_audio=6, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    synthetic.generate(TINY, out)
    return out


@pytest.fixture(scope="module")
def captions_only(tmp_path_factory) -> Path:
    """Every (shape, colour) pair twice, with no speech: for the caption and hold-out checks."""
    out = tmp_path_factory.mktemp("synthetic") / "captions"
    synthetic.generate(SyntheticConfig(n_images=72, n_audio=0, seed=3), out)
    return out


# ---------------------------------------------------------------------------------------------------- dataset


def test_layout_and_record(tiny):
    record = synthetic.generate(TINY, tiny)  # already complete: returns the stored record
    assert record["n_images"] == 24 and record["n_audio"] == 6
    assert (tiny / "_SUCCESS").is_file()
    assert Path(record["captions"]) == tiny / "captions.csv"
    images = _rows(tiny / "captions.csv")
    audio = _rows(tiny / "transcripts.csv")
    assert list(images[0]) == ["image", "caption", "shape", "colour", "size", "position", "background", "split"]
    assert {"audio", "transcript", "word", "voice", "rate", "pitch", "split"} <= set(audio[0])
    for row, folder, ext in [(r, r["shape"], "png") for r in images] + [(r, r["word"], "wav") for r in audio]:
        rel = Path(row.get("image") or row["audio"])
        assert (tiny / rel).is_file()
        assert rel.parts[1] == folder and rel.suffix == f".{ext}"
        assert re.fullmatch(r"(img|aud)-\d{6}", rel.stem)  # webdataset-safe: no dots in the key


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = tmp_path / "again"
    synthetic.generate(TINY, again)
    assert _files(again) == _files(tiny)
    other = tmp_path / "other"
    synthetic.generate(SyntheticConfig(n_images=24, n_audio=6, seed=1), other)
    a, b = _files(tiny), _files(other)
    assert a["captions.csv"] != b["captions.csv"] and a["transcripts.csv"] != b["transcripts.csv"]
    wavs = lambda files: {k: v for k, v in files.items() if k.endswith(".wav")}  # noqa: E731
    pngs = lambda files: {k: v for k, v in files.items() if k.endswith(".png")}  # noqa: E731
    assert wavs(a) != wavs(b) and pngs(a) != pngs(b)


def test_complete_output_is_reused(tiny, monkeypatch):
    monkeypatch.setattr(synthetic, "_images", lambda *a: pytest.fail("regenerated a complete dataset"))
    assert synthetic.generate(TINY, tiny)["n_images"] == 24


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(cfg, root):
        (root / "audio" / "circle").mkdir(parents=True)
        (root / "audio" / "circle" / "aud-000000.wav").write_bytes(b"partial")
        raise RuntimeError("speech engine died")

    monkeypatch.setattr(synthetic, "_audio", broken)
    out = tmp_path / "data" / "builtin"
    with pytest.raises(RuntimeError, match="speech engine died"):
        synthetic.generate(SyntheticConfig(n_images=6, n_audio=2), out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp sibling left behind


def test_images_rgb_sized_and_cover_every_shape_and_colour(tiny):
    rows = _rows(tiny / "captions.csv")
    assert {r["shape"] for r in rows} == set(SHAPES)
    assert {r["colour"] for r in rows} == set(COLOURS)
    for r in rows:
        img = Image.open(tiny / r["image"])
        assert img.mode == "RGB" and img.size == (TINY.image_size, TINY.image_size)
        px = np.asarray(img, dtype=np.int32)
        fg = np.abs(px - np.array(BACKGROUNDS[r["background"]])).sum(-1) > 60  # (H, W) shape pixels
        lo, hi = (0.02, 0.25) if r["size"] == "small" else (0.08, 0.6)
        assert lo < fg.mean() < hi, (r, fg.mean())


@pytest.mark.parametrize("shape", SHAPES)
def test_large_shape_shows_its_named_colour(shape):
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        img = synthetic.draw_shape(shape, rgb, BACKGROUNDS["grey"], "large", "centre", 32, rng)
        px = np.asarray(img, dtype=np.int32).reshape(-1, 3)
        fg = px[np.abs(px - np.array(BACKGROUNDS["grey"])).sum(-1) > 60]
        colours, counts = np.unique(fg, axis=0, return_counts=True)
        dominant = colours[counts.argmax()]
        assert np.abs(dominant - np.array(rgb)).max() <= 12, (shape, name, dominant)


def test_captions_name_colour_and_shape(captions_only):
    rows = _rows(captions_only / "captions.csv")
    for r in rows:
        words = r["caption"].replace(",", " ").split()
        assert r["colour"] in words and r["shape"] in words, r
    assert len({r["caption"] for r in rows}) > len(rows) // 3  # varied templates
    for t in range(len(synthetic.CAPTION_TEMPLATES)):
        text = synthetic.caption_for("star", "orange", "small", "top left", "black", template=t)
        assert "orange star" in text
        assert "a orange" not in text


def test_heldout_pairs_only_in_test(captions_only, tiny):
    rows = _rows(captions_only / "captions.csv")
    held = set(HELDOUT)
    assert {(r["shape"], r["colour"]) for r in rows if r["split"] == "test"} == held
    assert all(r["split"] == "" for r in rows if (r["shape"], r["colour"]) not in held)
    for r in _rows(tiny / "transcripts.csv"):
        said = (r["word"], r["colour"])
        assert r["split"] == ("test" if said in held else ""), r
        assert r["transcript"] == r["transcript"].lower() and r["word"] in r["transcript"].split()
        assert r["colour"] == "" or r["colour"] in r["transcript"].split()


def test_audio_files_are_16k_mono_pcm16(tiny):
    rows = _rows(tiny / "transcripts.csv")
    for r in rows:
        info = sf.info(tiny / r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert r["voice"] in speech.VOICES
        assert 130 <= int(r["rate"]) <= 210 and 30 <= int(r["pitch"]) <= 70


# ---------------------------------------------------------------------------------------------------- speech


def test_synthesize_speech():
    wav = speech.synthesize("a red circle")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 0.2 < len(wav) / 16000 < 3.0
    assert float(np.sqrt(np.mean(wav**2))) > 0.01
    assert np.abs(wav).max() <= 1.0


def test_voices_differ_and_repeat_exactly():
    first = {v: speech.synthesize("a red circle", voice=v) for v in speech.VOICES}
    for a, b in zip(speech.VOICES, speech.VOICES[1:]):
        assert len(first[a]) != len(first[b]) or not np.array_equal(first[a], first[b]), (a, b)
    speech.synthesize("the quick brown fox", voice="en+f3", rate=300, pitch=90)  # disturb the engine
    for v in speech.VOICES:
        assert np.array_equal(speech.synthesize("a red circle", voice=v), first[v]), v


def test_rate_and_pitch_change_the_sound():
    base = speech.synthesize("circle", rate=175, pitch=50)
    slow = speech.synthesize("circle", rate=120, pitch=50)
    assert len(slow) > len(base)
    high = speech.synthesize("circle", rate=175, pitch=80)
    assert len(high) != len(base) or not np.array_equal(high, base)


def test_bad_voice_and_arguments_raise():
    with pytest.raises(RuntimeError, match="no voice"):
        speech.synthesize("hello", voice="xx-nonexistent")
    with pytest.raises(RuntimeError, match="variant"):
        speech.synthesize("hello", voice="en+nosuchvariant")
    with pytest.raises(ValueError):
        speech.synthesize("   ")
    with pytest.raises(ValueError):
        speech.synthesize("hello", rate=10)


def test_resample_matches_torchaudio():
    torch = pytest.importorskip("torch")
    taf = pytest.importorskip("torchaudio.functional")
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    for sr in (16000, 8000, 44100):
        want = taf.resample(torch.from_numpy(x), speech.ESPEAK_SAMPLE_RATE, sr).numpy()
        got = speech.resample(x, speech.ESPEAK_SAMPLE_RATE, sr)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)
