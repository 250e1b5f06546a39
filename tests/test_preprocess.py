import json

import numpy as np
import pytest
import torch

from tasks.data.features import MelConfig, decode_audio, image_array, log_mel
from tasks.data.preprocess import PrepConfig, grid_patches, preprocess
from tasks.data.shards import ShardConfig, read_samples, shard_urls, write_shards
from tests.helpers import item_rows, png_bytes, wav_bytes, write_items

SMALL_MEL = MelConfig(n_mels=32, n_frames=48)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    write_items(tmp / "items.parquet", item_rows(40, 30))
    write_shards(tmp / "items.parquet", ShardConfig(maxcount=16), tmp / "shards")
    cfg = PrepConfig(image_size=16, mel=SMALL_MEL, batch_size=8, mel_patch=16, n_pixels=500, n_patches=200)
    record = preprocess(tmp / "shards", cfg, tmp / "prep")
    return tmp / "prep", cfg, record


def test_log_mel_shape_and_frames():
    cfg = MelConfig()
    assert (cfg.win_length, cfg.hop_length, cfg.n_fft) == (400, 160, 512)
    waves = [np.random.default_rng(0).standard_normal(n).astype(np.float32) for n in (8000, 16000, 40000)]
    mel = log_mel(waves, cfg)
    assert mel.shape == (3, 128, 128)
    assert torch.isfinite(mel).all()


def test_batched_mel_equals_one_at_a_time():
    waves = [decode_audio(wav_bytes(300 + 100 * i, 0.4))[0] for i in range(5)]
    batched = log_mel(waves, SMALL_MEL)
    single = torch.cat([log_mel([w], SMALL_MEL) for w in waves])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_mel_of_a_tone_peaks_at_its_frequency():
    low, high = (log_mel([decode_audio(wav_bytes(f, 1.0))[0]], SMALL_MEL)[0].mean(-1).argmax().item() for f in (300, 3000))
    assert low < high


def test_a_dc_offset_leaves_the_log_mel_as_it_was():
    """A constant added to a clip (a microphone's DC offset) would fill the lowest bands of every frame; each clip's
    mean is removed first, so the log-mel is the clean clip's, for a list of clips and for a batched tensor alike."""
    tone = decode_audio(wav_bytes(440, 0.4))[0]  # (N,)
    clean = log_mel([tone], SMALL_MEL)
    shifted = log_mel([tone + 0.2 * np.abs(tone).max()], SMALL_MEL)
    torch.testing.assert_close(shifted, clean, rtol=1e-3, atol=1e-3)
    tensor = log_mel(torch.from_numpy(tone + 0.2 * np.abs(tone).max())[None], SMALL_MEL)
    torch.testing.assert_close(tensor, clean, rtol=1e-3, atol=1e-3)


def test_image_array_and_patches():
    img = image_array(png_bytes((10, 20, 30), size=(40, 20)), 16)
    assert img.shape == (3, 16, 16) and img.dtype == np.uint8
    assert tuple(img[:, 8, 8]) == (10, 20, 30)
    x = np.arange(3 * 8 * 8).reshape(3, 8, 8)
    p = grid_patches(x, 4)
    assert p.shape == (4, 48)
    # patch 1 is the top-right block; its first vector entry is pixel (0, 4), channel 0
    assert p[1, 0] == x[0, 0, 4] and p[1, 1] == x[1, 0, 4]
    with pytest.raises(ValueError, match="patch size"):
        grid_patches(x, 3)


def test_preprocessed_shards(prepared):
    out, cfg, record = prepared
    stats = json.loads((out / "stats.json").read_text())
    assert stats["image"]["classes"] == ["circle", "square"] and stats["audio"]["classes"] == ["no", "yes"]
    n = 0
    for split in ("train", "val", "test"):
        for s in read_samples(shard_urls(out, "audio", split)):
            mel = np.load(__import__("io").BytesIO(s["mel.npy"]))
            assert mel.shape[0] == 32 and mel.shape[1] >= 48 and mel.dtype == np.float16  # own length, >= window
            info = json.loads(s["json"])
            assert stats["audio"]["classes"][info["label_id"]] == info["label"]
            n += 1
    assert n == 30
    imgs = [s for split in ("train", "val", "test") for s in read_samples(shard_urls(out, "image", split))]
    assert len(imgs) == 40
    assert np.load(__import__("io").BytesIO(imgs[0]["img.npy"])).shape == (3, 16, 16)


def test_mel_normalised_with_train_stats(prepared):
    out, _, _ = prepared
    import io

    train = np.concatenate([np.load(io.BytesIO(s["mel.npy"])).astype(np.float32)
                            for s in read_samples(shard_urls(out, "audio", "train"))], axis=1)
    assert abs(train.mean()) < 0.02 and abs(train.std() - 1) < 0.02


def test_patch_sample_set(prepared):
    out, _, record = prepared
    pixels = np.load(out / "patches" / "pixels.npy")
    img = np.load(out / "patches" / "image.npy")
    mel = np.load(out / "patches" / "mel.npy")
    assert pixels.shape[1] == 3 and pixels.dtype == np.uint8 and len(pixels) >= 500
    assert img.shape[1] == 4 * 4 * 3 and len(img) >= 200
    n_train = record["counts"]["audio"]["train"]
    assert mel.shape[1] == 16 * 16 and mel.dtype == np.float16
    assert len(mel) == n_train * 6  # a 32x48 mel has 2x3 patches of 16x16, all kept (cap per item: ceil(200/n) > 6)


def test_preprocess_is_deterministic(prepared, tmp_path):
    out, cfg, record = prepared
    again = preprocess(out.parent / "shards", cfg, tmp_path / "again")
    assert again["digest"] == record["digest"]


def test_bad_prep_config():
    with pytest.raises(ValueError, match="image_patch"):
        PrepConfig(image_size=30, image_patch=4)


def _speaker_rows(n: int = 24) -> list[dict]:
    """n clips of the same tones said by speaker "a" and, three times louder, by "b" (another microphone)."""
    rows = []
    for r in item_rows(0, n):
        i = int(r["key"].split("-")[1])
        louder = i >= n // 2
        payload = wav_bytes(200 + 20 * (i % (n // 2)), 0.3)
        if louder:
            wave, sr = decode_audio(payload)
            buf = __import__("io").BytesIO()
            __import__("soundfile").write(buf, 3 * wave, sr, format="WAV", subtype="PCM_16")
            payload = buf.getvalue()
        rows.append({**r, "payload": payload, "meta": json.dumps({"speaker": "b" if louder else "a"})})
    return rows


def _band_means_by(out, field: str) -> dict[str, np.ndarray]:
    """Each group's mean stored log-mel per band over its clips' own frames (0.3 s: the first 31 of 48)."""
    import io

    got: dict[str, list] = {}
    for split in ("train", "val", "test"):
        for s in read_samples(shard_urls(out, "audio", split, allow_empty=True)):
            mel = np.load(io.BytesIO(s["mel.npy"])).astype(np.float64)[:, :31]
            got.setdefault(json.loads(s["json"])["meta"][field], []).append(mel)
    return {g: np.concatenate(m, 1).mean(1) for g, m in got.items()}


def test_normalise_by_a_field_moves_each_groups_mean_spectrum_to_the_trains(tmp_path):
    write_items(tmp_path / "items.parquet", _speaker_rows())
    write_shards(tmp_path / "items.parquet", ShardConfig(maxcount=16, split_by="speaker", test_groups=("b",),
                                                         val_fraction=0.0), tmp_path / "shards")
    base = PrepConfig(image_size=16, mel=SMALL_MEL, batch_size=8, mel_patch=16, n_pixels=50, n_patches=20)
    before = preprocess(tmp_path / "shards", base, tmp_path / "plain")
    plain = _band_means_by(tmp_path / "plain", "speaker")
    record = preprocess(tmp_path / "shards", PrepConfig(**{**vars(base), "normalise_by": "speaker"}), tmp_path / "cmn")
    shifted = _band_means_by(tmp_path / "cmn", "speaker")
    std = json.loads((tmp_path / "cmn" / "stats.json").read_text())["audio"]["std"]
    # 3x the amplitude is 9x the power: ln 9 = 2.2 nats more in every band of b, the held-out speaker
    assert np.median(plain["b"] - plain["a"]) * std == pytest.approx(np.log(9), abs=0.1)
    assert np.abs(shifted["b"] - shifted["a"]).max() < 0.02  # float16 storage
    groups = json.loads((tmp_path / "cmn" / "stats.json").read_text())["audio"]["normalised_by"]
    assert groups["field"] == "speaker" and groups["groups"]["b"]["level"] == pytest.approx(np.log(9), abs=0.1)
    assert record["digest"] != before["digest"]


def test_normalise_by_a_field_a_clip_lacks_names_the_clip(tmp_path):
    write_items(tmp_path / "items.parquet", item_rows(0, 6))
    write_shards(tmp_path / "items.parquet", ShardConfig(maxcount=16), tmp_path / "shards")
    cfg = PrepConfig(image_size=16, mel=SMALL_MEL, batch_size=8, mel_patch=16, normalise_by="speaker")
    with pytest.raises(ValueError, match=r"clip aud-\d+ has no 'speaker' value to normalise by"):
        preprocess(tmp_path / "shards", cfg, tmp_path / "prep")
    assert not (tmp_path / "prep").exists()
