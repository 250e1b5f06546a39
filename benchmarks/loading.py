"""Data loading: samples/s of the train split through three paths with the same workers, batch size and collation.

    candidate   preprocessed webdataset shards -> tasks.loader.batches -> registry collation (vit_batch / ast_batch)
    baseline a  raw PNG/WAV files -> torch DataLoader that decodes and computes features (image_array, log_mel) per item
    baseline b  the same preprocessed arrays as one .npy file each -> torch DataLoader (np.load per item)

The dataset is built in a temp dir with the plain functions of the data plane (no Prefect), as tasks/data.py chains
them: synthetic.generate -> ingest.ingest -> shards.write_shards -> preprocess.preprocess (shards of 100 samples,
so every worker has shards to read).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import Row, check, interleaved, median
from tasks import ingest, loader, preprocess, shards, synthetic
from tasks.features import decode_audio, image_array, log_mel
from tasks.registry import BatchContext, DataInfo, ast_batch, vit_batch

BATCH = 64
WORKERS = 2
TARGETS = {"raw": ">= 3", "npy": ">= 1"}


def build(root: Path, n_images: int, n_audio: int) -> tuple[Path, Path]:
    """Generate, ingest, shard and preprocess a small dataset under root; returns (dataset dir, prep dir)."""
    data = Path(synthetic.generate(synthetic.SyntheticConfig(n_images=n_images, n_audio=n_audio), root / "raw")["path"])
    res = ingest.ingest(ingest.Sources(images=data / "images", audio=data / "audio", captions=data / "captions.csv",
                                       transcripts=data / "transcripts.csv"), ingest.IngestConfig(), root / "ingest")
    shards.write_shards(res.items_path, shards.ShardConfig(maxcount=100), root / "shards")
    preprocess.preprocess(root / "shards", preprocess.PrepConfig(maxcount=100, n_patches=2000, n_pixels=2000),
                          root / "prep")
    return data, root / "prep"


def collate(modality: str, items: list[tuple[np.ndarray, int]], ctx: BatchContext) -> dict:
    """The tensors registry's vit_batch / ast_batch produce, from (array, label) pairs."""
    x = torch.from_numpy(np.stack([a for a, _ in items])).float()
    if modality == "image":
        x = (x / 255.0 - ctx.mean) / ctx.std
        return {"image": x, "label": torch.tensor([y for _, y in items])}
    return {"mel": x, "label": torch.tensor([y for _, y in items])}


class RawFiles(Dataset):
    """Decode a PNG/WAV and compute its model input on the fly (uint8 image; normalised float16 log-mel)."""

    def __init__(self, paths: list[Path], labels: list[int], modality: str, stats: dict):
        self.paths, self.labels, self.modality, self.stats = paths, labels, modality, stats

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        data = self.paths[i].read_bytes()
        if self.modality == "image":
            return image_array(data, self.stats["image"]["size"]), self.labels[i]
        wave, _ = decode_audio(data)
        mel = log_mel([wave])[0].numpy()  # (n_mels, n_frames)
        a = self.stats["audio"]
        return ((mel - a["mean"]) / a["std"]).astype(np.float16), self.labels[i]


class NpyFiles(Dataset):
    def __init__(self, paths: list[Path], labels: list[int]):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return np.load(self.paths[i]), self.labels[i]


def _loader(ds: Dataset, modality: str, ctx: BatchContext) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=WORKERS,
                      collate_fn=lambda items: collate(modality, items, ctx), generator=torch.Generator().manual_seed(0))


def run(quick: bool = False, full: bool = False) -> list[Row]:
    n_images, n_audio = (160, 80) if quick else (600, 300)
    reps = 2 if quick else 3
    global BATCH
    BATCH = 16 if quick else 64
    with tempfile.TemporaryDirectory(prefix="tessera-bench-load-") as tmp:
        root = Path(tmp)
        data, prep = build(root, n_images, n_audio)
        info = DataInfo.load(prep)
        ctx = BatchContext(info, cfg=None)
        manifest = pq.read_table(root / "shards" / "manifest.parquet").to_pylist()
        train = [r for r in manifest if r["split"] == "train"]
        classes = {m: info.stats[m]["classes"] for m in ("image", "audio")}

        # baseline a: the raw files the train items came from
        raw = {m: ([Path(data) / r["source"] if not Path(r["source"]).is_absolute() else Path(r["source"])
                    for r in train if r["modality"] == m],
                   [classes[m].index(r["label"]) for r in train if r["modality"] == m]) for m in classes}
        # baseline b: the preprocessed arrays of the train split, one .npy each
        npy = {m: ([], []) for m in classes}
        (root / "npy").mkdir()
        for m, field in (("image", "img"), ("audio", "mel")):
            for batch in loader.batches(loader.shard_urls(prep, m, "train"), 256, train=False):
                for s in batch:
                    p = root / "npy" / f"{s['__key__']}.npy"
                    np.save(p, s[field])
                    npy[m][0].append(p)
                    npy[m][1].append(int(s["info"]["label_id"]))
        urls = {m: loader.shard_urls(prep, m, "train") for m in classes}
        make = {"image": vit_batch, "audio": ast_batch}
        counted: dict[str, int] = {}

        def epoch(name, batches_of):
            n = 0
            for m in ("image", "audio"):
                for b in batches_of(m):
                    n += len(b["label"])
            counted[name] = n

        def candidate():
            epoch("shards", lambda m: (make[m](s, ctx) for s in
                                       loader.batches(urls[m], BATCH, num_workers=WORKERS, shuffle_buffer=256)))

        def raw_files():
            epoch("raw", lambda m: _loader(RawFiles(*raw[m], m, info.stats), m, ctx))

        def npy_files():
            epoch("npy", lambda m: _loader(NpyFiles(*npy[m]), m, ctx))

        times = interleaved({"raw": raw_files, "npy": npy_files, "shards": candidate}, reps)
    rate = {k: counted[k] / median(v) for k, v in times.items()}
    sizes = (f"train split of {n_images} images + {n_audio} clips ({len(raw['image'][0])} + {len(raw['audio'][0])}), "
             f"batch {BATCH}, {WORKERS} workers, shards of 100")
    rows = []
    for base, label in (("raw", "raw PNG/WAV decoded + features per item"), ("npy", "one .npy per sample")):
        ratio = rate["shards"] / rate[base]
        passed = check(ratio, TARGETS[base])
        note = "" if passed else (f"miss: shards stream at {ratio:.2f}x the {label} path; an epoch here is "
                                  f"{counted['shards']} samples; not profiled, so the cause is not known (worker "
                                  "start-up per epoch, paid by every path, is one untested suspect)")
        rows.append(Row(f"loading_vs_{base}", f"throughput ratio (shards samples/s / {base} samples/s)", sizes,
                        f"{label}: {rate[base]:.0f} samples/s", f"webdataset shards + collation: {rate['shards']:.0f} samples/s",
                        round(ratio, 3), TARGETS[base], passed, note,
                        extra={"seconds": times, "samples_per_epoch": counted}))
    return rows
