"""Stream model-ready shards (tasks/data/preprocess.py) into batches of decoded samples.

    prep_dir/{modality}/{split}-*.tar  ->  shards split by node (DDP rank), then by DataLoader worker
                                       ->  shard order shuffled, samples shuffled in a buffer (seeded by seed, epoch)
                                       ->  decoded: {"__key__", "__url__", "img" | "mel": ndarray, "info": dict}
                                           (+ "draw" when training: a seed of (seed, epoch, key) for random crops)
                                       ->  lists of batch_size samples

A mel is (n_mels, T) with T its clip's own length (at least the window; tasks/data/preprocess.py): each distinct shape
has its own cached .npy header, and the arrays stay views of the shard buffer. What a model makes of T > n_frames (a
random crop per draw, every window, the first window) is tasks/train/batches.py's.

The order is a function of (seed, epoch, number of nodes and workers) alone, so a resumed run sees the data the
uninterrupted run would have seen; `start_batch` skips the batches an epoch had already given out. Batches are lists
of samples: the model's collate (tasks/train/table.py, `make_batch`) runs in the training process, where skipping a
batch costs only its decoding. A shard that does not read raises `CorruptShardError` naming it.

The shard list comes from tasks/data/shards.py `shard_urls` (sorted, each shard checked intact).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from tasks.data import shards
from tasks.data.shards import CorruptShardError
from tasks.infra import storage

FIELDS = {"img.npy": "img", "mel.npy": "mel"}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed per (seed, epoch): different epochs, different orders; the same pair, the same order."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------------- hot path
# Shards are read whole into memory and walked header by header (tasks/data/shards.py `tar_members`, the walk the
# integrity check makes; no tarfile objects); .npy headers are parsed once per distinct header and the arrays are
# views of the shard's buffer. Shard splitting, shuffling and batching stay webdataset's stages. It pays for itself:
# benchmarks/loading.py row loading_reader_vs_webdataset, an epoch of the built-in train split (2112 samples, batch
# 64, collation included) against plain wds.WebDataset + np.load / json.loads giving the same batches: 3.2-4.5x as
# fast with 0 workers (the trainer's default), 1.4x with 2 (AMD EPYC, 2 cores). Below 1.25x, use webdataset's reader.
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split: "dir/key.img.npy"
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}  # header bytes -> (shape, fortran, dtype)
_NPY_CACHE = 4096  # distinct headers kept: clips stored at their own lengths give one per length


def _read_shard(url: str) -> bytearray:
    """The whole shard in one writable buffer: a local path (or file://) read straight into it, a URL through
    tasks/infra/storage (fsspec)."""
    loc = storage.location(url)
    if isinstance(loc, Path):
        with open(loc, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(buf)
        return buf if n == len(buf) else buf[:n]
    return bytearray(storage.read_bytes(loc))


def _raw_samples(buf: bytearray, url: str) -> Iterator[dict]:
    """Members grouped into samples as webdataset groups them: {"__key__", "__url__", ext: memoryview}. The members
    come from the same header walk as the integrity check (tasks/data/shards.py `tar_members`)."""
    view = memoryview(buf)
    sample: dict | None = None
    for name, start, end in shards.tar_members(lambda offset, n: buf[offset:offset + n], len(buf)):
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        m = _KEY.match(name)
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {url}")
        sample[ext] = view[start:end]
    if sample is not None:
        yield sample


def _npy(data) -> np.ndarray:
    """.npy bytes (any buffer) -> an array viewing them, no copy; each distinct header is parsed once.

    Like np.load(allow_pickle=False): object arrays are refused; a damaged header or a short buffer is a ValueError.
    """
    data = memoryview(data)
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy member (bad magic string)")
    major = data[6]
    if major == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    header = bytes(data[:start])
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        fp = io.BytesIO(header[8:])
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        meta = read(fp)  # (shape, fortran_order, dtype); a garbled header raises ValueError
        if meta[2].hasobject:
            raise ValueError("object arrays (pickles) are not loaded")
        if len(_NPY_HEADERS) > _NPY_CACHE:  # many different shapes: keep the cache small
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = meta
    shape, fortran, dtype = meta
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def decode(sample: dict) -> dict:
    """Raw tar members (bytes or memoryviews) -> {"__key__", "__url__", "img" | "mel": ndarray, "info": dict}.

    Arrays read from a shard buffer are writable views of it (no copy): a sample kept alive keeps its shard's buffer.
    """
    out = {"__key__": sample["__key__"], "__url__": sample.get("__url__", "")}
    try:
        for ext, name in FIELDS.items():
            if ext in sample:
                out[name] = _npy(sample[ext])
        out["info"] = json.loads(bytes(sample["json"]))
    except (ValueError, KeyError, OSError, UnicodeDecodeError) as exn:
        raise CorruptShardError(
            f"sample {sample['__key__']} in shard {out['__url__']} does not decode "
            f"({type(exn).__name__}: {str(exn)[:200]}); re-run `tessera data`"
        ) from exn
    return out


def shard_samples(url: str) -> Iterator[dict]:
    """The decoded samples of one shard, in file order (what `batches` streams, shard by shard)."""
    try:
        buf = _read_shard(url)
        raw = list(_raw_samples(buf, url))
    except (OSError, ValueError) as exn:
        raise CorruptShardError(
            f"shard {url} cannot be read ({type(exn).__name__}: {str(exn)[:200]}); the prepared data is damaged "
            "or incomplete: re-run `tessera data` (delete the prep folder to rebuild it)"
        ) from exn
    for sample in raw:
        yield decode(sample)


def _decoded(sources: Iterator[dict]) -> Iterator[dict]:
    """webdataset stage: shard records {"url"} -> the decoded samples of each shard, in file order."""
    for source in sources:
        yield from shard_samples(source["url"])


def draw_seed(seed: int, key: str) -> int:
    """A 31-bit seed per (epoch seed, sample key): what a training draw of that sample randomises with (its crop)."""
    return zlib.crc32(f"{seed}/{key}".encode()) & 0x7FFFFFFF


def _tag_draws(seed: int, samples: Iterator[dict]) -> Iterator[dict]:
    """webdataset stage (training only): each sample gets "draw", its seed for this epoch."""
    for sample in samples:
        sample["draw"] = draw_seed(seed, sample["__key__"])
        yield sample


def _as_list(samples: list[dict]) -> list[dict]:
    return list(samples)


def _identity(x):
    return x


def batches(
    urls: list[str],
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    start_batch: int = 0,
    train: bool = True,
    split_nodes: bool = True,
) -> Iterator[list[dict]]:
    """One epoch of batches (lists of decoded samples), deterministic for a given (seed, epoch).

    train=True: shard order and samples shuffled (buffer `shuffle_buffer`), partial last batch dropped (every step
    sees batch_size samples). train=False: file order, last partial batch kept (evaluation sees every sample).
    split_nodes: each DDP rank reads its own shards (webdataset's split_by_node); False: every rank reads them all.
    start_batch: skip the first batches of this epoch (resuming mid-epoch).
    train=True also tags each sample with "draw" (draw_seed of the epoch's seed and its key): a new random crop of a
    long clip every epoch (tasks/train/batches.py), the same one in a resumed run.

    The stages are those wds.WebDataset(urls, shardshuffle=len(urls), seed=...) chains (so the order is the one it
    gives), with its tarfile expander and np.load replaced by `_decoded`.
    """
    if not urls:
        raise ValueError("no shards given")
    s = epoch_seed(seed, epoch)
    stages: list = [wds.SimpleShardList(list(urls))]
    if split_nodes:
        stages.append(wds.split_by_node)
    stages.append(wds.split_by_worker)
    if train:
        stages.append(wds.shuffle(len(urls), seed=s))  # shard order
    stages.append(_decoded)
    if train:
        stages.append(functools.partial(_tag_draws, s))
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=s))
    stages.append(wds.batched(batch_size, collation_fn=_as_list, partial=not train))
    dataset = wds.DataPipeline(*stages)
    workers = max(0, min(num_workers, len(urls)))  # a worker without a shard would idle
    # batch_size=None: batches come whole from the pipeline; collate_fn=_identity keeps numpy arrays as they are.
    # generator: DataLoader draws its base seed from it, not from the global RNG a resumed run has restored.
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(s),
        persistent_workers=False,
    )
    return itertools.islice(iter(loader), start_batch, None)
