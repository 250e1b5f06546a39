"""Data loading: samples/s of the train split through three paths with the same workers, batch size and collation.

    candidate   preprocessed webdataset shards -> tasks.loader.batches -> registry collation (vit_batch / ast_batch)
    baseline a  raw PNG/WAV files -> torch DataLoader that decodes and computes features (image_array, log_mel) per item
    baseline b  the same preprocessed arrays as one .npy file each -> torch DataLoader (np.load per item)

The dataset is the built-in one at its default size (SyntheticConfig: 2000 images, 1000 clips), built in a temp dir
with the plain functions of the data plane (no Prefect), as tasks/data.py chains them: synthetic.generate ->
ingest.ingest -> shards.write_shards -> preprocess.preprocess, in shards of 200 samples (8 image and 4 audio train
shards: every one of the 2 workers has the same number to read).

One timed call is one epoch of the train split (images, then audio), as the trainer streams it: a new loader per
epoch, so every path pays its worker start-up once per modality per epoch. Everything runs with the torch thread
count training uses (TrainConfig.cpu_threads, 1): the candidate collates in the training process, the baselines in
their workers (DataLoader workers always run one torch thread).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from benchmarks.common import Row, check, interleaved, median, torch_threads
from tasks import ingest, loader, preprocess, shards, synthetic
from tasks.features import decode_audio, image_array, log_mel
from tasks.registry import BatchContext, DataInfo, ast_batch, vit_batch
from tasks.train import TrainConfig

WORKERS = 2
TARGETS = {"raw": ">= 3", "npy": ">= 1"}


def build(root: Path, n_images: int, n_audio: int, maxcount: int = 200, **prep) -> tuple[Path, Path, dict[str, float]]:
    """Generate, ingest, shard and preprocess a dataset under root -> (dataset dir, prep dir, seconds per stage).

    prep: PrepConfig fields; by default a small patch sample (2000 patches and pixels: codebooks are not measured here).
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    data = Path(synthetic.generate(synthetic.SyntheticConfig(n_images=n_images, n_audio=n_audio), root / "raw")["path"])
    t["generate"], t0 = time.perf_counter() - t0, time.perf_counter()
    res = ingest.ingest(ingest.Sources(images=data / "images", audio=data / "audio", captions=data / "captions.csv",
                                       transcripts=data / "transcripts.csv"), ingest.IngestConfig(), root / "ingest")
    t["ingest"], t0 = time.perf_counter() - t0, time.perf_counter()
    shards.write_shards(res.items_path, shards.ShardConfig(maxcount=maxcount), root / "shards")
    t["shard"], t0 = time.perf_counter() - t0, time.perf_counter()
    preprocess.preprocess(root / "shards", preprocess.PrepConfig(**{"maxcount": maxcount, "n_patches": 2000,
                                                                     "n_pixels": 2000, **prep}), root / "prep")
    t["preprocess"] = time.perf_counter() - t0
    return data, root / "prep", t


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


class _Nothing(IterableDataset):
    def __iter__(self):
        return iter(())


def _loader(ds: Dataset, modality: str, ctx: BatchContext, batch: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=WORKERS,
                      collate_fn=lambda items: collate(modality, items, ctx),
                      generator=torch.Generator().manual_seed(0))


def run(quick: bool = False) -> list[Row]:
    defaults = synthetic.SyntheticConfig()
    n_images, n_audio, maxcount = (64, 32, 16) if quick else (defaults.n_images, defaults.n_audio, 200)
    batch = 8 if quick else 64
    reps = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="tessera-bench-load-") as tmp, torch_threads(TrainConfig().cpu_threads):
        root = Path(tmp)
        data, prep, _ = build(root, n_images, n_audio, maxcount)
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
            for b in loader.batches(loader.shard_urls(prep, m, "train"), 256, train=False):
                for s in b:
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

        def shards_with(workers):
            return lambda: epoch(f"shards_w{workers}", lambda m: (make[m](s, ctx) for s in loader.batches(
                urls[m], batch, num_workers=workers, shuffle_buffer=1000)))

        def raw_files():
            epoch("raw", lambda m: _loader(RawFiles(*raw[m], m, info.stats), m, ctx, batch))

        def npy_files():
            epoch("npy", lambda m: _loader(NpyFiles(*npy[m]), m, ctx, batch))

        def startup():  # what every path pays per epoch: two loaders (one per modality) start and stop 2 workers
            for _ in classes:
                list(DataLoader(_Nothing(), batch_size=None, num_workers=WORKERS))

        times = interleaved({"raw": raw_files, "npy": npy_files, "shards": shards_with(WORKERS),
                             "shards_0_workers": shards_with(0), "worker_startup": startup}, reps)
    counted["shards"], counted["shards_0_workers"] = counted.pop(f"shards_w{WORKERS}"), counted.pop("shards_w0")
    rate = {k: counted[k] / median(times[k]) for k in counted}
    start_s = median(times["worker_startup"])
    sizes = (f"train split of {n_images} images + {n_audio} clips ({len(raw['image'][0])} + {len(raw['audio'][0])}), "
             f"batch {batch}, {WORKERS} workers, shards of {maxcount} ({len(urls['image'])} + {len(urls['audio'])} "
             f"train shards), 1 torch thread")
    rows = []
    for base, label in (("raw", "raw PNG/WAV decoded + features per item"), ("npy", "one .npy per sample")):
        ratio = rate["shards"] / rate[base]
        passed = check(ratio, TARGETS[base])
        note = (f"epoch of {counted['shards']} samples; {WORKERS}-worker start-up and shutdown, paid by every path, "
                f"is {start_s:.2f} s of the shards path's {median(times['shards']):.2f} s per epoch; with 0 workers "
                f"the shards path streams {rate['shards_0_workers']:.0f} samples/s")
        if not passed:
            note = (f"miss: {ratio:.2f}x; the fixed cost of starting {WORKERS} workers per loader bounds the ratio "
                    f"(the per-sample work of the shards path is small next to it); " + note)
        rows.append(Row(f"loading_vs_{base}", f"throughput ratio (shards samples/s / {base} samples/s)", sizes,
                        f"{label}: {rate[base]:.0f} samples/s", f"webdataset shards + collation: {rate['shards']:.0f} "
                        "samples/s", round(ratio, 3), TARGETS[base], passed, note,
                        extra={"seconds": times, "samples_per_epoch": counted, "samples_per_s": rate}))
    return rows
