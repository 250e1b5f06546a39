"""Turn raw shards into model-ready shards, normalisation statistics and a patch sample set.

Input: a shards directory (tasks/data/shards.py). Output, under a content-addressed directory:
    image/{split}-000000.tar   __key__, img.npy  uint8 (3, S, S), json {label, label_id, text, meta}
    audio/{split}-000000.tar   __key__, mel.npy  float16 (n_mels, n_frames), normalised, json
    stats.json                 classes per modality, image mean/std per channel (0..1 scale), mel mean/std
    patches/pixels.npy         uint8 (N, 3) random train pixels (the ImageGPT colour palette is fit on these)
    patches/image.npy          uint8 (N, P*P*3) grid-aligned train image patches
    patches/mel.npy            float16 (N, P*P) grid-aligned train spectrogram patches (normalised)
Spectrograms are computed in batches. Mel mean/std come from the train split alone (a first pass), then every
split is normalised with them (a second pass), as the AST recipe does.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import pyarrow.parquet as pq
import webdataset as wds

from tasks.infra import storage
from tasks.infra.common import atomic_dir, progress, tree_digest, write_json
from models.vq import patchify
from tasks.data.features import MelConfig, decode_audio, image_array, log_mel
from tasks.data.shards import SPLITS, read_samples, shard_urls

AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class PrepConfig:
    image_size: int = 32
    mel: MelConfig = field(default_factory=MelConfig)
    batch_size: int = 64  # spectrograms per torchaudio call
    image_patch: int = 4
    mel_patch: int = 16
    n_pixels: int = 100_000
    n_patches: int = 50_000
    maxcount: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.image_size % self.image_patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of image_patch={self.image_patch}")
        if self.mel.n_mels % self.mel_patch or self.mel.n_frames % self.mel_patch:
            raise ValueError(
                f"mel grid {self.mel.n_mels}x{self.mel.n_frames} is not a multiple of mel_patch={self.mel_patch}"
            )


def grid_patches(x: np.ndarray, p: int) -> np.ndarray:
    """(C, H, W) array -> (H/P * W/P, P*P*C) non-overlapping patches in raster order, laid out (p1, p2, c):
    the numpy face of models.vq.patchify, so the codebooks are fit on the vectors the models will tokenise."""
    return patchify(torch.from_numpy(np.ascontiguousarray(x))[None], p)[0].numpy()


def _payload(sample: dict, exts: tuple[str, ...]) -> bytes:
    for ext in exts:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample['__key__']} has none of {exts} (has {sorted(sample)})")


class _PatchSampler:
    """Keeps a fixed number of random rows per train item so the sample set is ~n rows, deterministic by seed."""

    def __init__(self, n_total: int, n_items: int, rng: np.random.Generator):
        self.per_item = max(1, -(-n_total // max(1, n_items)))
        self.rng = rng
        self.rows: list[np.ndarray] = []

    def add(self, rows: np.ndarray) -> None:
        k = min(self.per_item, len(rows))
        self.rows.append(rows[self.rng.choice(len(rows), size=k, replace=False)])

    def array(self, dtype) -> np.ndarray:
        return np.concatenate(self.rows).astype(dtype) if self.rows else np.zeros((0, 0), dtype)


def _classes(manifest, modality: str) -> list[str]:
    labels = {r["label"] for r in manifest if r["modality"] == modality and r["label"] is not None}
    return sorted(labels)


def data_facts(manifest, modality: str) -> dict:
    """What the train split of one modality can feed (tasks/train/table.py `feeds` reads it): how many items, how
    many carry a label and a text (caption or transcript), how many distinct texts, and the most common text's share
    of the items that have one (1.0: every caption is the same)."""
    train = [r for r in manifest if r["modality"] == modality and r["split"] == "train"]
    texts = [r["text"] for r in train if r["text"]]
    counts = collections.Counter(texts)
    return {"train_items": len(train), "labelled": sum(r["label"] is not None for r in train),
            "with_text": len(texts), "distinct_texts": len(counts),
            "top_text_share": counts.most_common(1)[0][1] / len(texts) if texts else 0.0}


def _info(sample: dict, classes: list[str]) -> dict:
    info = json.loads(sample["json"])
    label = info.get("label")
    info["label_id"] = classes.index(label) if label in classes else -1
    return info


def _images(shards: Path, tmp: Path, cfg: PrepConfig, classes, counts, rng) -> dict:
    pixels = _PatchSampler(cfg.n_pixels, counts.get("train", 0), rng)
    patches = _PatchSampler(cfg.n_patches, counts.get("train", 0), rng)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    n_px = 0
    (tmp / "image").mkdir()
    for split in SPLITS:
        urls = shard_urls(shards, "image", split, allow_empty=True)
        if not urls:
            continue
        with wds.ShardWriter(str(tmp / "image" / f"{split}-%06d.tar"), maxcount=cfg.maxcount, mtime=0, verbose=0) as sink:
            for s in progress(read_samples(urls), total=counts.get(split), desc=f"images/{split}", unit="img"):
                img = image_array(_payload(s, IMAGE_EXTS), cfg.image_size)  # (3, S, S) uint8
                sink.write({"__key__": s["__key__"], "img.npy": img, "json": _info(s, classes)})
                if split == "train":
                    flat = img.reshape(3, -1).T  # (S*S, 3)
                    pixels.add(flat)
                    patches.add(grid_patches(img, cfg.image_patch))
                    x = flat / 255.0
                    total += x.sum(0)
                    total_sq += (x**2).sum(0)
                    n_px += len(x)
    np.save(tmp / "patches" / "pixels.npy", pixels.array(np.uint8))
    np.save(tmp / "patches" / "image.npy", patches.array(np.uint8))
    mean = total / max(n_px, 1)
    std = np.sqrt(np.maximum(total_sq / max(n_px, 1) - mean**2, 1e-12))
    return {"classes": classes, "mean": mean.tolist(), "std": std.tolist(), "size": cfg.image_size}


def _mel_batches(urls: list[str], cfg: PrepConfig, desc: str, total: int | None):
    """Yield (samples, log-mel (B, n_mels, n_frames) float32) in batches of cfg.batch_size."""
    batch: list[dict] = []
    waves: list[np.ndarray] = []

    def flush():
        return batch, log_mel(waves, cfg.mel).numpy()

    for s in progress(read_samples(urls), total=total, desc=desc, unit="clip"):
        wave, sr = decode_audio(_payload(s, AUDIO_EXTS))
        if sr != cfg.mel.sample_rate:
            raise ValueError(
                f"clip {s['__key__']} is {sr} Hz but the mel config expects {cfg.mel.sample_rate} Hz; "
                "ingest with the same --sample-rate"
            )
        batch.append(s)
        waves.append(wave)
        if len(batch) == cfg.batch_size:
            yield flush()
            batch, waves = [], []
    if batch:
        yield flush()


def _audio(shards: Path, tmp: Path, cfg: PrepConfig, classes, counts, rng) -> dict:
    train = shard_urls(shards, "audio", "train", allow_empty=True)
    # pass 1: dataset mean/std of the log-mel on the train split (one scalar each, as AST does)
    s1 = s2 = n = 0.0
    for _, mel in _mel_batches(train, cfg, "mel stats", counts.get("train")):
        s1 += float(mel.sum(dtype=np.float64))
        s2 += float((mel.astype(np.float64) ** 2).sum())
        n += mel.size
    if n == 0:
        raise ValueError("no train audio to compute spectrogram statistics from; add audio or lower test/val fractions")
    mean = s1 / n
    std = max((s2 / n - mean**2) ** 0.5, 1e-6)
    # pass 2: normalised spectrograms for every split, patches from the train split
    patches = _PatchSampler(cfg.n_patches, counts.get("train", 0), rng)
    (tmp / "audio").mkdir()
    for split in SPLITS:
        urls = shard_urls(shards, "audio", split, allow_empty=True)
        if not urls:
            continue
        with wds.ShardWriter(str(tmp / "audio" / f"{split}-%06d.tar"), maxcount=cfg.maxcount, mtime=0, verbose=0) as sink:
            for samples, mel in _mel_batches(urls, cfg, f"mel/{split}", counts.get(split)):
                mel = ((mel - mean) / std).astype(np.float16)  # (B, n_mels, n_frames)
                for s, m in zip(samples, mel):
                    sink.write({"__key__": s["__key__"], "mel.npy": m, "json": _info(s, classes)})
                    if split == "train":
                        patches.add(grid_patches(m[None], cfg.mel_patch))
    np.save(tmp / "patches" / "mel.npy", patches.array(np.float16))
    return {"classes": classes, "mean": mean, "std": std, "mel": vars(cfg.mel) | {"hop_length": cfg.mel.hop_length}}


def prep_changes(manifest, cfg: PrepConfig) -> dict[str, int]:
    """What preprocessing changes, counted: clips longer than the spectrogram window are cut (the window is
    --n-frames), images not already image_size x image_size are centre-cropped and resized."""
    window = (cfg.mel.n_frames - 1) * cfg.mel.hop_ms / 1000
    cut = sum(r["modality"] == "audio" and (r["duration_s"] or 0) > window + 1e-6 for r in manifest)
    resized = sum(r["modality"] == "image" and (r["width"], r["height"]) != (cfg.image_size,) * 2 for r in manifest)
    return {k: n for k, n in ((f"audio clips cut to the {window:.2f} s window (--n-frames {cfg.mel.n_frames})", cut),
                              (f"images cropped and resized to {cfg.image_size}x{cfg.image_size}", resized)) if n}


def preprocess(shards: Path | str, cfg: PrepConfig, out_dir: Path | str) -> dict:
    """Write model-ready shards, stats and patch samples for `shards` into `out_dir` atomically (either may be an
    fsspec URL: tasks/infra/storage.py)."""
    shards = storage.location(shards)
    with storage.open(storage.join(shards, "manifest.parquet")) as f:
        manifest = pq.read_table(f).to_pylist()
    counts: dict = {}
    for r in manifest:
        counts.setdefault(r["modality"], {}).setdefault(r["split"], 0)
        counts[r["modality"]][r["split"]] += 1
    rng = np.random.default_rng(cfg.seed)
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        (tmp / "patches").mkdir()
        stats: dict = {"counts": counts}
        if "image" in counts:
            stats["image"] = _images(shards, tmp, cfg, _classes(manifest, "image"), counts["image"], rng)
            stats["image"]["facts"] = data_facts(manifest, "image")
        if "audio" in counts:
            stats["audio"] = _audio(shards, tmp, cfg, _classes(manifest, "audio"), counts["audio"], rng)
            stats["audio"]["facts"] = data_facts(manifest, "audio")
        stats["changes"] = prep_changes(manifest, cfg)
        write_json(tmp / "stats.json", stats)
        record.update(digest=tree_digest(tmp)[:32], counts=counts, changes=stats["changes"])
    return record
