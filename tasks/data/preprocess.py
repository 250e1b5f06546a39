"""Turn raw shards into model-ready shards, normalisation statistics and a patch sample set.

Input: a shards directory (tasks/data/shards.py). Output, under a content-addressed directory:
    image/{split}-000000.tar   __key__, img.npy  uint8 (3, S, S), json {label, label_id, text, meta}
    audio/{split}-000000.tar   __key__, mel.npy  float16 (n_mels, T), normalised, json; n_frames <= T <= max_frames
    stats.json                 classes per modality, image mean/std per channel (0..1 scale), mel mean/std, the window
    patches/pixels.npy         uint8 (N, 3) random train pixels (the ImageGPT colour palette is fit on these)
    patches/image.npy          uint8 (N, P*P*3) grid-aligned train image patches
    patches/mel.npy            float16 (N, P*P) grid-aligned train spectrogram patches (normalised)
Spectrograms are computed in batches. Mel mean/std come from the train split alone (a first pass), then every
split is normalised with them (a second pass), as the AST recipe does. With normalise_by (--normalise-by speaker), a
pass before those moves each group's mean log-mel per band, over all its clips, to the train split's
(`_group_offsets`; stats.json's audio `normalised_by` says each group's level and largest band offset).

The clip window (n_frames, what the audio models see at once) is decided here, from the manifest (`clip_window`):
--n-frames, else --clip-seconds, else the 95th percentile of the train clips' durations; in frames of 10 ms that hold
it whole, rounded up to a multiple of the mel patch (16), at least one patch, at most MAX_WINDOW_FRAMES (10.24 s).
A clip is stored at its own length in whole frames: a shorter one zero-padded to the window, a longer one kept up to
max_windows windows (cut there, counted). What the models do with the frames beyond the window: tasks/train/batches.py.
"""

from __future__ import annotations

import collections
import dataclasses
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
from tasks.data.features import MelConfig, clip_log_mels, decode_audio, image_array
from tasks.data.shards import ordered_splits, read_samples, shard_urls

AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
WINDOW_PERCENTILE = 95  # the default window holds this percentile of the train clips' durations whole
MAX_WINDOW_FRAMES = 1024  # 10.24 s: the default window's cap (a transformer over 64 x 8 patches)
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
    clip_seconds: float | None = None  # the window in seconds (mel.n_frames must then be None); both None: the data's
    max_windows: int = 4  # a clip is stored up to this many windows long; longer ones are cut (counted in changes)
    # a metadata field (e.g. "speaker"): each group's mean log-mel per band over all its clips is moved to the train
    # split's (speaker-level cepstral mean normalisation, as Kaldi's apply-cmvn with utt2spk); None: no shift
    normalise_by: str | None = None

    def __post_init__(self):
        if self.image_size % self.image_patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of image_patch={self.image_patch}")
        if self.mel.n_mels % self.mel_patch or (self.mel.n_frames or 0) % self.mel_patch:
            raise ValueError(
                f"mel grid {self.mel.n_mels}x{self.mel.n_frames} is not a multiple of mel_patch={self.mel_patch}; "
                f"pass --n-frames as a multiple of {self.mel_patch}"
            )
        if self.clip_seconds is not None and self.mel.n_frames is not None:
            raise ValueError(f"--n-frames {self.mel.n_frames} and --clip-seconds {self.clip_seconds:g} both set the "
                             "clip window; pass one of them")
        if (self.clip_seconds is not None and self.clip_seconds <= 0) or self.max_windows < 1:
            raise ValueError(f"clip_seconds={self.clip_seconds}, max_windows={self.max_windows}: need clip_seconds > 0 "
                             "and max_windows >= 1")

    @property
    def max_frames(self) -> int:
        """The longest stored log-mel, in frames: max_windows windows."""
        return self.max_windows * self.mel.n_frames


def grid_patches(x: np.ndarray, p: int) -> np.ndarray:
    """(C, H, W) array -> (H/P * W/P, P*P*C) non-overlapping patches in raster order, laid out (p1, p2, c):
    the numpy face of models.vq.patchify, so the codebooks are fit on the vectors the models will tokenise."""
    return patchify(torch.from_numpy(np.ascontiguousarray(x))[None], p)[0].numpy()


def clip_window(manifest, cfg: PrepConfig) -> tuple[int, str]:
    """(n_frames, why): the window given (--n-frames, --clip-seconds) or, by default, the frames that hold the
    WINDOW_PERCENTILE of the train audio clips' durations whole (mel.frames_for), rounded up to a multiple of
    mel_patch, at least one patch, at most MAX_WINDOW_FRAMES."""
    mel, p = cfg.mel, cfg.mel_patch
    if mel.n_frames is not None:
        return mel.n_frames, f"--n-frames {mel.n_frames}"
    if cfg.clip_seconds is not None:
        frames = mel.frames_for(round(cfg.clip_seconds * mel.sample_rate))
        return p * -(-frames // p), f"--clip-seconds {cfg.clip_seconds:g}"
    durations = [r["duration_s"] for r in manifest
                 if r["modality"] == "audio" and r["split"] == "train" and r.get("duration_s") is not None]
    if not durations:
        raise ValueError("no train audio clip has a duration in the manifest to choose the clip window from; "
                         "pass --n-frames or --clip-seconds")
    seconds = float(np.percentile(durations, WINDOW_PERCENTILE))
    frames = mel.frames_for(round(seconds * mel.sample_rate))
    n = min(max(p, p * -(-frames // p)), p * (MAX_WINDOW_FRAMES // p))
    capped = f", capped at {MAX_WINDOW_FRAMES} frames" if n < frames else ""
    return n, f"p{WINDOW_PERCENTILE} of {len(durations)} train clips = {seconds:.2f} s{capped}"


def window_record(cfg: PrepConfig, why: str) -> dict:
    """The window as stats.json and the stage's record keep it: frames, the seconds of audio it holds, the longest
    stored clip (frames) and why this window."""
    n = cfg.mel.n_frames
    return {"n_frames": n, "seconds": round((n - 1) * cfg.mel.hop_ms / 1000, 4), "max_frames": cfg.max_frames,
            "why": why}


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
    for split in ordered_splits(counts):
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
    """Yield (samples, B log-mels float32 (n_mels, T_i), n_frames <= T_i <= max_frames) in batches of batch_size."""
    batch: list[dict] = []
    waves: list[np.ndarray] = []

    def flush():  # the batch's samples, log-mels and frames of each inside its clip (the rest is padding)
        inside = [min(cfg.mel.frames_for(len(w)), cfg.max_frames) for w in waves]
        return batch, clip_log_mels(waves, cfg.mel, cfg.max_frames), inside

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


def group_of(sample: dict, field: str) -> str:
    """The value of metadata `field` (PrepConfig.normalise_by) a sample's clip is normalised with."""
    value = (json.loads(sample["json"]).get("meta") or {}).get(field)
    if value is None or value == "":
        raise ValueError(f"clip {sample['__key__']} has no {field!r} value to normalise by; give every clip one (a "
                         "table column or a --name-pattern field) or drop --normalise-by")
    return str(value)


def _group_offsets(shards: Path, cfg: PrepConfig, counts: dict) -> dict[str, np.ndarray]:
    """--normalise-by FIELD: each group's mean log-mel per band over its clips' frames (every split: a held-out
    speaker's audio, never its labels) minus the same over the train split's, (n_mels,) float64 per group."""
    sums: dict[str, np.ndarray] = {}
    frames: dict[str, int] = collections.defaultdict(int)
    train_sum, train_n = np.zeros(cfg.mel.n_mels), 0
    for split in ordered_splits(counts):
        urls = shard_urls(shards, "audio", split, allow_empty=True)
        for samples, mels, inside in _mel_batches(urls, cfg, f"group means/{split}", counts.get(split)):
            for s, mel, t in zip(samples, mels, inside):
                band = mel[:, :t].astype(np.float64).sum(1)  # (n_mels,): the clip's own frames, not its padding
                g = group_of(s, cfg.normalise_by)
                sums[g] = sums.get(g, 0.0) + band
                frames[g] += t
                if split == "train":
                    train_sum, train_n = train_sum + band, train_n + t
    train_mean = train_sum / max(train_n, 1)
    return {g: sums[g] / frames[g] - train_mean for g in sorted(sums)}


def _audio(shards: Path, tmp: Path, cfg: PrepConfig, classes, counts, rng) -> dict:
    train = shard_urls(shards, "audio", "train", allow_empty=True)
    offsets = _group_offsets(shards, cfg, counts) if cfg.normalise_by else {}
    # pass 1: dataset mean/std of the log-mel on the train split (one scalar each, as AST does)
    s1 = s2 = n = 0.0
    for samples, mels, inside in _mel_batches(train, cfg, "mel stats", counts.get("train")):
        for s, mel, t in zip(samples, mels, inside):  # (n_mels, T)
            if offsets:
                mel = _shifted(mel, offsets[group_of(s, cfg.normalise_by)], t)
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
    for split in ordered_splits(counts):
        urls = shard_urls(shards, "audio", split, allow_empty=True)
        if not urls:
            continue
        with wds.ShardWriter(str(tmp / "audio" / f"{split}-%06d.tar"), maxcount=cfg.maxcount, mtime=0, verbose=0) as sink:
            for samples, mels, inside in _mel_batches(urls, cfg, f"mel/{split}", counts.get(split)):
                for s, mel, t in zip(samples, mels, inside):
                    if offsets:
                        mel = _shifted(mel, offsets[group_of(s, cfg.normalise_by)], t)
                    m = ((mel - mean) / std).astype(np.float16)  # (n_mels, T)
                    sink.write({"__key__": s["__key__"], "mel.npy": m, "json": _info(s, classes)})
                    if split == "train":  # the grid-aligned part: whole patches in time
                        patches.add(grid_patches(m[None, :, : m.shape[1] - m.shape[1] % cfg.mel_patch], cfg.mel_patch))
    np.save(tmp / "patches" / "mel.npy", patches.array(np.float16))
    out = {"classes": classes, "mean": mean, "std": std, "mel": vars(cfg.mel) | {"hop_length": cfg.mel.hop_length}}
    if offsets:  # per group: its clips' mean level against the train split's, and its largest band offset (nats)
        out["normalised_by"] = {"field": cfg.normalise_by, "groups": {
            g: {"level": round(float(o.mean()), 4), "largest": round(float(np.abs(o).max()), 4)}
            for g, o in offsets.items()}}
    return out


def _shifted(mel: np.ndarray, offset: np.ndarray, inside: int) -> np.ndarray:
    """(n_mels, T) log-mel with its group's per-band offset taken off its first `inside` frames (the clip's own; the
    padding after them stays the silence it is)."""
    mel = mel.copy()
    mel[:, :inside] -= offset[:, None].astype(mel.dtype)
    return mel


def prep_changes(manifest, cfg: PrepConfig) -> dict[str, int]:
    """What preprocessing changes, counted (cfg.mel.n_frames: the decided window): audio clips longer than the window
    (the classifiers see random crops of them in training and average over their windows in evaluation), those of
    them with a transcript (the speech models read their first window only), clips longer than max_windows windows
    (cut there); images not already image_size x image_size (centre-cropped and resized)."""
    mel, n = cfg.mel, cfg.mel.n_frames
    audio = [r for r in manifest if r["modality"] == "audio"]
    need = [mel.frames_for(round((r["duration_s"] or 0) * mel.sample_rate)) for r in audio]  # frames to hold it
    seconds = (n - 1) * mel.hop_ms / 1000 if n else 0.0
    cap = (cfg.max_frames - 1) * mel.hop_ms / 1000 if n else 0.0
    resized = sum(r["modality"] == "image" and (r["width"], r["height"]) != (cfg.image_size,) * 2 for r in manifest)
    counts = (
        (f"audio clips longer than the {seconds:.2f} s window: classifiers train on random {seconds:.2f} s crops and "
         "average over the windows at evaluation", sum(t > n for t in need)),
        (f"transcribed audio clips longer than the {seconds:.2f} s window: cut to it for the speech models",
         sum(t > n and bool(r.get("text")) for t, r in zip(need, audio))),
        (f"audio clips longer than {cap:.2f} s ({cfg.max_windows} windows): cut to it", sum(t > cfg.max_frames
                                                                                         for t in need)),
        (f"images cropped and resized to {cfg.image_size}x{cfg.image_size}", resized),
    )
    return {k: c for k, c in counts if c}


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
    window = None
    if "audio" in counts:  # the clip window, decided once from the manifest (--n-frames, --clip-seconds or p95)
        n_frames, why = clip_window(manifest, cfg)
        cfg = dataclasses.replace(cfg, mel=dataclasses.replace(cfg.mel, n_frames=n_frames), clip_seconds=None)
        window = window_record(cfg, why)
    with atomic_dir(out_dir, record) as tmp:
        (tmp / "patches").mkdir()
        stats: dict = {"counts": counts}
        if "image" in counts:
            stats["image"] = _images(shards, tmp, cfg, _classes(manifest, "image"), counts["image"], rng)
            stats["image"]["facts"] = data_facts(manifest, "image")
        if "audio" in counts:
            stats["audio"] = _audio(shards, tmp, cfg, _classes(manifest, "audio"), counts["audio"], rng)
            stats["audio"]["facts"] = data_facts(manifest, "audio")
            stats["audio"]["window"] = window
        stats["changes"] = prep_changes(manifest, cfg)
        write_json(tmp / "stats.json", stats)
        record.update(digest=tree_digest(tmp)[:32], counts=counts, changes=stats["changes"])
        if window:
            record["window"] = window
    return record
