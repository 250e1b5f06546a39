"""Write validated items into webdataset tar shards with a Parquet manifest.

Input: the `items.parquet` that ingest wrote (one row per validated image or audio item, payload bytes included).
Output, under a content-addressed directory:
    {modality}/{split}-000000.tar   webdataset samples: __key__, <payload ext>, txt, json
    manifest.parquet                key, modality, split, shard, label, text, sha256, nbytes, width, height, ...
    _SUCCESS                        digest, counts, the shard list with each shard's sha256
The split is a function of the key alone (a salted hash), so it is stable when items are added; a row's own
`split` value (e.g. held-out zero-shot combinations) overrides it.

`out_dir` (and `items`) may be fsspec URLs (s3://bucket/prefix, gs://, memory://): the shards are written to a local
temporary folder, uploaded, and `_SUCCESS` is written last; readers (`shard_urls`) refuse a remote folder without
it. webdataset opens remote shard URLs through fsspec (`gopen_schemes` below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from webdataset.gopen import gopen_schemes

from tasks import storage
from tasks.common import atomic_dir, digest, file_sha256, progress, require_finished

SPLITS = ("train", "val", "test")

# webdataset opens a URL through its table of schemes: local paths, file:, pipe:, http(s) through curl, gs through
# gsutil; any other scheme raises. Remote stores go through fsspec instead, with the credentials it writes them with.
gopen_schemes["__default__"] = storage.gopen
for _scheme in ("gs", "gcs"):
    gopen_schemes[_scheme] = storage.gopen

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("modality", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("label", pa.string()),
        ("text", pa.string()),
        ("payload_ext", pa.string()),
        ("sha256", pa.string()),
        ("nbytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("duration_s", pa.float32()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)


@dataclass(frozen=True)
class ShardConfig:
    maxcount: int = 1000  # samples per shard
    maxsize: int = 256 << 20  # bytes per shard
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_salt: str = "tessera"

    def __post_init__(self):
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be >= 0 and sum to < 1"
            )
        if self.maxcount < 1:
            raise ValueError(f"maxcount={self.maxcount} must be >= 1")


def assign_split(key: str, cfg: ShardConfig) -> str:
    """train/val/test from a salted hash of the key: depends on nothing but the key."""
    h = int.from_bytes(hashlib.sha256(f"{cfg.split_salt}:{key}".encode()).digest()[:8], "big") / 2**64
    if h < cfg.test_fraction:
        return "test"
    if h < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def manifest_digest(table: pa.Table) -> str:
    """Digest of the manifest's content: its rows without `source` (where a file was read from is not what it is),
    not the Parquet bytes (they depend on the writer version)."""
    rows = table.drop_columns(["source"]).sort_by("key").to_pylist()
    return digest(rows, n=32)


def _sample(row: dict) -> dict:
    sample = {"__key__": row["key"], row["payload_ext"]: row["payload"]}
    if row.get("text"):
        sample["txt"] = row["text"].encode()
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    info = {"key": row["key"], "modality": row["modality"], "label": row["label"], "text": row["text"], "meta": meta}
    sample["json"] = json.dumps(info, sort_keys=True).encode()
    return sample


def write_shards(items: Path | str, cfg: ShardConfig, out_dir: Path | str) -> dict:
    """Shard `items.parquet` into `out_dir` (a folder or a URL) atomically; return the `_SUCCESS` record."""
    items = storage.location(items)
    if not storage.isfile(items):
        raise FileNotFoundError(f"items table {items} does not exist; run ingest first")
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp, contextlib.ExitStack() as stack:
        writers: dict[tuple[str, str], wds.ShardWriter] = {}
        rows_out = []
        pf = pq.ParquetFile(items if isinstance(items, Path) else stack.enter_context(storage.open(items)))
        for batch in progress(pf.iter_batches(batch_size=256), desc="shards", unit="batch"):
            for row in batch.to_pylist():
                split = row.get("split") or assign_split(row["key"], cfg)
                if split not in SPLITS:
                    raise ValueError(f"item {row['key']} has split={split!r}; use one of {SPLITS} or leave it empty")
                group = (row["modality"], split)
                if group not in writers:
                    (tmp / row["modality"]).mkdir(exist_ok=True)
                    pattern = str(tmp / row["modality"] / f"{split}-%06d.tar")
                    # mtime=0: same items -> byte-identical shards
                    writers[group] = wds.ShardWriter(pattern, maxcount=cfg.maxcount, maxsize=cfg.maxsize, mtime=0, verbose=0)
                writer = writers[group]
                writer.write(_sample(row))
                shard = str(Path(writer.fname).relative_to(tmp))
                rows_out.append({**{k: row.get(k) for k in MANIFEST_SCHEMA.names}, "split": split, "shard": shard})
        for w in writers.values():
            w.close()
        if not rows_out:
            raise ValueError(f"items table {items} is empty: nothing to shard")
        table = pa.Table.from_pylist(rows_out, schema=MANIFEST_SCHEMA)
        pq.write_table(table, tmp / "manifest.parquet")
        shards = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.tar"))
        counts: dict = {}
        for r in rows_out:
            counts.setdefault(r["modality"], {}).setdefault(r["split"], 0)
            counts[r["modality"]][r["split"]] += 1
        record.update(
            digest=manifest_digest(table),
            counts=counts,
            shards={s: {"sha256": file_sha256(tmp / s), "bytes": (tmp / s).stat().st_size} for s in shards},
        )
    return record


def shard_urls(shards_dir: Path | str, modality: str, split: str) -> list[str]:
    """The tar files of one modality and split, in order: paths, or URLs for a remote `shards_dir`, which must be
    finished (hold `_SUCCESS`: on an object store the files appear one by one, and the marker comes last)."""
    require_finished(shards_dir)
    return storage.glob(storage.join(shards_dir, modality), f"{split}-*.tar")


def read_samples(urls: list[str]):
    """Iterate samples of the given shards in order (no shuffling, no worker split): for preprocessing and tests."""
    if not urls:
        return iter(())
    return iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None))
