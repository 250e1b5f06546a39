"""Stream model-ready shards (tasks/preprocess.py) into batches of decoded samples.

    prep_dir/{modality}/{split}-*.tar  ->  shards split by node (DDP rank), then by DataLoader worker
                                       ->  shard order shuffled, samples shuffled in a buffer (seeded by seed, epoch)
                                       ->  decoded: {"__key__", "__url__", "img" | "mel": ndarray, "info": dict}
                                       ->  lists of batch_size samples

The order is a function of (seed, epoch, number of nodes and workers) alone, so a resumed run sees the data the
uninterrupted run would have seen; `start_batch` skips the batches an epoch had already given out. Batches are lists
of samples: the model's collate (tasks/registry.py, `make_batch`) runs in the training process, where skipping a
batch costs only its decoding. A shard that does not read raises `CorruptShardError` naming it.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from tasks import shards

FIELDS = {"img.npy": "img", "mel.npy": "mel"}
BLOCK = 512  # tar block size


class CorruptShardError(RuntimeError):
    """A model-ready shard that cannot be read; the message names it and the fix."""


def shard_urls(prep_dir: str | Path, modality: str, split: str) -> list[str]:
    """The tar files of one modality and split, sorted and checked for truncation; a clear error when none."""
    urls = shards.shard_urls(Path(prep_dir), modality, split)
    if not urls:
        raise FileNotFoundError(
            f"no {modality} shards for split {split!r} in {Path(prep_dir) / modality}; run `tessera data` first "
            f"(or check that the data has {modality} items in the {split} split)"
        )
    for url in urls:
        check_complete(url)
    return urls


def check_complete(path: str | Path) -> None:
    """Walk a tar's member headers (seeking over the data) to its end-of-archive marker; raise if it is not intact.

    Python's tarfile, and so webdataset, reads a tar cut at a member boundary, or one with a damaged header, as a
    shorter valid archive and says nothing; this walk catches both, naming the shard, in milliseconds per shard.
    Damage inside a member's data shows up when the sample is decoded (`decode`).
    """
    size = os.path.getsize(path)
    zero = bytes(BLOCK)
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                problem = f"it ends at byte {size} without an end-of-archive marker (truncated)"
                break
            if block == zero:
                if f.read(BLOCK) == zero:
                    return
                problem = f"a zero block at byte {offset} is not followed by the end-of-archive marker"
                break
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                problem = f"the member header at byte {offset} is damaged ({exc})"
                break
            offset += BLOCK + -(-info.size // BLOCK) * BLOCK
    raise CorruptShardError(f"shard {path} is truncated or damaged: {problem}; re-run `tessera data` "
                            "(delete the prep folder to rebuild it)")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed per (seed, epoch): different epochs, different orders; the same pair, the same order."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def _shard_of(exn: BaseException) -> str | None:
    """Webdataset appends the shard URL to an exception's args as it passes up the pipeline; find it."""
    for arg in reversed(exn.args):
        if isinstance(arg, str) and arg.endswith(".tar"):
            return arg
    return None


def _reraise_corrupt(exn: BaseException) -> bool:
    """webdataset handler: a tar read error becomes one message that names the shard and the fix.

    Webdataset calls the handler at each stage the error passes; until a stage has appended the URL, the original
    exception goes on up unchanged.
    """
    url = _shard_of(exn)
    if url is None or isinstance(exn, CorruptShardError):
        raise exn
    first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
    raise CorruptShardError(
        f"shard {url} cannot be read ({type(exn).__name__}: {first}); the prepared data is damaged or "
        "incomplete: re-run `tessera data` (delete the prep folder to rebuild it)"
    ) from exn


def decode(sample: dict) -> dict:
    """Raw tar members -> {"__key__", "__url__", "img" | "mel": ndarray, "info": dict}."""
    out = {"__key__": sample["__key__"], "__url__": sample.get("__url__", "")}
    try:
        for ext, name in FIELDS.items():
            if ext in sample:
                out[name] = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        out["info"] = json.loads(sample["json"])
    except (ValueError, KeyError, OSError) as exn:
        raise CorruptShardError(
            f"sample {sample['__key__']} in shard {out['__url__']} does not decode "
            f"({type(exn).__name__}: {str(exn)[:200]}); re-run `tessera data`"
        ) from exn
    return out


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
    """
    if not urls:
        raise ValueError("no shards given")
    s = epoch_seed(seed, epoch)
    dataset = wds.WebDataset(
        urls,
        shardshuffle=len(urls) if train else False,
        seed=s,
        nodesplitter=wds.split_by_node if split_nodes else None,
        workersplitter=wds.split_by_worker,
        handler=_reraise_corrupt,
        empty_check=False,
    )
    if train and shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=s)
    dataset = dataset.map(decode).batched(batch_size, collation_fn=_as_list, partial=not train)
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
