"""Data loading: samples/s of the train split through four paths with the same workers, batch size and collation.

    candidate   preprocessed webdataset shards -> tasks.data.loader.batches -> collation (vit_batch / ast_batch)
    baseline a  raw PNG/WAV files -> torch DataLoader that decodes and computes features (image_array, log_mel) per item
    baseline b  the same preprocessed arrays as one .npy file each -> torch DataLoader (np.load per item)
    baseline c  the same shards -> plain wds.WebDataset(urls, shardshuffle=...) (its tarfile expander) decoded with
                np.load / json.loads, shuffled and batched as loader.batches does: the same batches, same order

Row c decides whether loader.batches keeps its own zero-copy reader (shards read whole, members found by the header
walk the integrity check uses, arrays as views of the shard's buffer) or uses webdataset's: it stays only where an
epoch at the trainer's default worker count (TrainConfig.num_workers) is at least TARGETS["webdataset"] times as
fast. The run first checks that both paths give identical batches (keys and arrays), so the ratio compares equal work.

The dataset is the built-in one at its default size (SyntheticConfig: 2000 images, 1000 clips), built in a temp dir
with the plain functions of the data plane (no Prefect), as the data stages (tasks/stages.py) chain them:
synthetic.generate -> ingest.ingest -> shards.write_shards -> preprocess.preprocess, in shards of 200 samples (8 image
and 4 audio train shards: every one of the 2 workers has the same number to read).

One timed call is one epoch of the train split (images, then audio), as the trainer streams it: a new loader per
epoch, so every path pays its worker start-up once per modality per epoch. Everything runs with the torch thread
count training uses (TrainConfig.cpu_threads, 1): the candidate collates in the training process, the baselines in
their workers (DataLoader workers always run one torch thread).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from benchmarks.common import Row, check, interleaved, median, torch_threads
from tasks.data import ingest
from tasks.data import loader
from tasks.data import preprocess
from tasks.data import shards
from tasks.data.builtin import synthetic
from tasks.data.features import decode_audio, image_array, log_mel
from tasks.train.batches import BatchContext, DataInfo, ast_batch, vit_batch
from tasks.train.trainer import TrainConfig

WORKERS = 2
TARGETS = {"raw": ">= 3", "npy": ">= 1", "webdataset": ">= 1.25"}


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
    """The tensors vit_batch / ast_batch (tasks/train/batches.py) produce, from (array, label) pairs."""
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


def plain_decode(sample: dict) -> dict:
    """webdataset's raw sample -> the loader's layout, decoded the plain way: np.load and json.loads."""
    out = {"__key__": sample["__key__"], "__url__": sample["__url__"]}
    for ext, field in loader.FIELDS.items():
        if ext in sample:
            out[field] = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    out["info"] = json.loads(sample["json"])
    return out


def _identity(x):
    return x


def plain_webdataset(urls: list[str], batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000,
                     num_workers: int = 0) -> wds.WebLoader:
    """loader.batches(train=True) built from webdataset's own reader: the same stages, seeds and loader settings."""
    s = loader.epoch_seed(seed, epoch)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=s, nodesplitter=wds.split_by_node, empty_check=False)
               .map(plain_decode)
               .shuffle(shuffle_buffer, initial=shuffle_buffer, seed=s)
               .batched(batch_size, collation_fn=list, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=min(num_workers, len(urls)), collate_fn=_identity,
                         generator=torch.Generator().manual_seed(s), persistent_workers=False)


def same_batches(a, b) -> bool:
    """Whether two streams of batches hold the same samples in the same order: keys, arrays and info."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(
        len(x) == len(y) and all(
            s["__key__"] == t["__key__"] and s["info"] == t["info"]
            and all(np.array_equal(s[f], t[f]) and s[f].dtype == t[f].dtype for f in ("img", "mel") if f in s or f in t)
            for s, t in zip(x, y))
        for x, y in zip(a, b))


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
            for b in loader.batches(shards.shard_urls(prep, m, "train"), 256, train=False):
                for s in b:
                    p = root / "npy" / f"{s['__key__']}.npy"
                    np.save(p, s[field])
                    npy[m][0].append(p)
                    npy[m][1].append(int(s["info"]["label_id"]))
        urls = {m: shards.shard_urls(prep, m, "train") for m in classes}
        make = {"image": vit_batch, "audio": ast_batch}
        counted: dict[str, int] = {}
        for m in classes:  # baseline c reads exactly what the candidate reads, in the same order
            if not same_batches(loader.batches(urls[m], batch, shuffle_buffer=1000),
                                plain_webdataset(urls[m], batch, shuffle_buffer=1000)):
                raise AssertionError(f"loader.batches and plain webdataset give different {m} batches")

        def epoch(name, batches_of):
            n = 0
            for m in ("image", "audio"):
                for b in batches_of(m):
                    n += len(b["label"])
            counted[name] = n

        def shards_with(workers):
            return lambda: epoch(f"shards_w{workers}", lambda m: (make[m](s, ctx) for s in loader.batches(
                urls[m], batch, num_workers=workers, shuffle_buffer=1000)))

        def webdataset_with(workers):
            return lambda: epoch(f"webdataset_w{workers}", lambda m: (make[m](s, ctx) for s in plain_webdataset(
                urls[m], batch, num_workers=workers, shuffle_buffer=1000)))

        def raw_files():
            epoch("raw", lambda m: _loader(RawFiles(*raw[m], m, info.stats), m, ctx, batch))

        def npy_files():
            epoch("npy", lambda m: _loader(NpyFiles(*npy[m]), m, ctx, batch))

        def startup():  # what every path pays per epoch: two loaders (one per modality) start and stop 2 workers
            for _ in classes:
                list(DataLoader(_Nothing(), batch_size=None, num_workers=WORKERS))

        times = interleaved({"raw": raw_files, "npy": npy_files, "shards": shards_with(WORKERS),
                             "shards_0_workers": shards_with(0), "webdataset": webdataset_with(WORKERS),
                             "webdataset_0_workers": webdataset_with(0), "worker_startup": startup}, reps)
    for path in ("shards", "webdataset"):
        counted[path], counted[f"{path}_0_workers"] = counted.pop(f"{path}_w{WORKERS}"), counted.pop(f"{path}_w0")
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

    # row c: the loader's own reader against webdataset's, at the trainer's default worker count (0: the training
    # process reads the shards itself) and, in the note, at WORKERS
    ratios = {0: rate["shards_0_workers"] / rate["webdataset_0_workers"], WORKERS: rate["shards"] / rate["webdataset"]}
    workers = TrainConfig().num_workers
    suffix = "_0_workers" if workers == 0 else ""
    ratio = ratios[workers]
    passed = check(ratio, TARGETS["webdataset"])
    other = WORKERS if workers == 0 else 0
    note = (f"identical batches (keys, arrays, info) checked first; at {other} workers: {ratios[other]:.2f}x "
            f"({rate['shards' + ('' if other else '_0_workers')]:.0f} vs "
            f"{rate['webdataset' + ('' if other else '_0_workers')]:.0f} samples/s)")
    if not passed:
        note = (f"miss: {ratio:.2f}x; the zero-copy reader does not pay for its code: loader.batches should use "
                "webdataset's reader; " + note)
    rows.append(Row("loading_reader_vs_webdataset", "throughput ratio (loader.batches samples/s / plain webdataset "
                    "samples/s)", sizes.replace(f"{WORKERS} workers", f"{workers} workers (TrainConfig default)"),
                    f"wds.WebDataset + np.load/json.loads: {rate['webdataset' + suffix]:.0f} samples/s",
                    f"loader.batches (zero-copy reader): {rate['shards' + suffix]:.0f} samples/s", round(ratio, 3),
                    TARGETS["webdataset"], passed, note,
                    extra={"ratio_by_workers": ratios, "seconds": times, "samples_per_epoch": counted,
                           "samples_per_s": rate}))
    return rows
