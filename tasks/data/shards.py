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

Reading shards, these and preprocess's model-ready ones alike: `shard_urls` lists a split's tar files, each checked
intact by `check_complete`, a walk over its member headers (`tar_members`, the same walk tasks/data/loader.py reads
model-ready shards with); `read_samples` iterates raw samples through webdataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from webdataset.gopen import gopen_schemes

from tasks.infra import storage
from tasks.infra.common import atomic_dir, digest, file_sha256, progress, require_finished
from tasks.data.ingest.sources import SPLITS, is_split, ordered_splits, test_sets  # noqa: F401 (the split names)

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
        ("split_source", pa.string()),  # where the split came from: "given", "hash of key" or "FIELD=group"
    ]
)


@dataclass(frozen=True)
class ShardConfig:
    maxcount: int = 1000  # samples per shard
    maxsize: int = 256 << 20  # bytes per shard
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_salt: str = "tessera"
    # group split: every item with the same value of this metadata field (a table column, a --name-pattern field, or
    # "label") lands in one split: a speaker, fold or session is never in two
    split_by: str | None = None
    test_groups: tuple[str, ...] = ()  # groups named for the test split (the rest: val_groups, else train)
    val_groups: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "test_groups", tuple(self.test_groups))
        object.__setattr__(self, "val_groups", tuple(self.val_groups))
        if (self.test_groups or self.val_groups) and not self.split_by:
            raise ValueError("test_groups/val_groups name groups of --split-by FIELD; pass --split-by too")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be >= 0 and sum to < 1"
            )
        if self.maxcount < 1:
            raise ValueError(f"maxcount={self.maxcount} must be >= 1")


def split_of(row: dict, cfg: ShardConfig) -> tuple[str, str]:
    """(split, where it came from) of one item: the row's own split (a table column or a split folder), else its
    group's (cfg.split_by: named groups, or a hash of the group value), else a hash of its key."""
    if row.get("split"):
        return row["split"], "given"
    if not cfg.split_by:
        return assign_split(row["key"], cfg), "hash of key"
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    group = row.get("label") if cfg.split_by == "label" else meta.get(cfg.split_by)
    if group is None:
        raise ValueError(f"item {row['key']} ({row.get('source')}) has no {cfg.split_by!r} value to split by; give "
                         f"it that column, a --name-pattern field, or drop --split-by")
    group = str(group)
    source = f"{cfg.split_by}={group}"
    if group in cfg.test_groups:
        return "test", source
    if group in cfg.val_groups:
        return "val", source
    if cfg.test_groups and not cfg.val_groups:  # val: a share of the other groups' items (held-out takes)
        val_only = dataclasses.replace(cfg, test_fraction=0.0, split_by=None, test_groups=())
        return assign_split(row["key"], val_only), f"{source}; val by hash of key"
    if cfg.test_groups or cfg.val_groups:
        return "train", source
    return assign_split(group, cfg), source


def check_group_split(rows: list[dict], cfg: ShardConfig) -> None:
    """With --split-by: no group in two splits (a given split can override a group), and every split the fractions
    ask for gets a group; a one-line ValueError otherwise."""
    if not cfg.split_by:
        return
    groups: dict[str, set[str]] = {}
    for r in rows:
        if r["split_source"].startswith(f"{cfg.split_by}="):
            groups.setdefault(r["split"], set()).add(r["split_source"])
    wanted = [s for s, f, named in (("test", cfg.test_fraction, cfg.test_groups), ("val", cfg.val_fraction,
              cfg.val_groups)) if (named or (f > 0 and not (cfg.test_groups or cfg.val_groups)))]
    groups.setdefault("train", set()).update(groups.pop("val", set()) if cfg.test_groups and not cfg.val_groups
                                             else set())
    empty = [s for s in ["train", *wanted] if not groups.get(s)]
    if empty:
        n = len(set().union(*groups.values())) if groups else 0
        raise ValueError(f"--split-by {cfg.split_by}: {n} group(s) leave the {' and '.join(empty)} split(s) empty; "
                         "name the groups with --test-groups/--val-groups, or change the fractions")


def assign_split(key: str, cfg: ShardConfig) -> str:
    """train/val/test from a salted hash of the key (or group): depends on nothing but it."""
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
                split, source = split_of(row, cfg)
                if not is_split(split):
                    raise ValueError(f"item {row['key']} has split={split!r}; use train, val, test, test_<name> or "
                                     "leave it empty")
                group = (row["modality"], split)
                if group not in writers:
                    (tmp / row["modality"]).mkdir(exist_ok=True)
                    pattern = str(tmp / row["modality"] / f"{split}-%06d.tar")
                    # mtime=0: same items -> byte-identical shards
                    writers[group] = wds.ShardWriter(pattern, maxcount=cfg.maxcount, maxsize=cfg.maxsize, mtime=0,
                                                     verbose=0)
                writer = writers[group]
                writer.write(_sample(row))
                shard = str(Path(writer.fname).relative_to(tmp))
                rows_out.append({**{k: row.get(k) for k in MANIFEST_SCHEMA.names}, "split": split, "shard": shard,
                                 "split_source": source})
        for w in writers.values():
            w.close()
        if not rows_out:
            raise ValueError(f"items table {items} is empty: nothing to shard")
        check_group_split(rows_out, cfg)
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


def shard_urls(shards_dir: Path | str, modality: str, split: str, *, allow_empty: bool = False) -> list[str]:
    """The tar files of one modality and split, in name order, each checked intact (`check_complete`): paths, or
    URLs for a remote `shards_dir`, which must be finished (hold `_SUCCESS`: on an object store the files appear one
    by one, and the marker comes last). No shard is a FileNotFoundError naming the fix, unless `allow_empty` (a split
    or modality the data may lack), which returns []. Works for the raw shards here and preprocess's model-ready ones.
    """
    require_finished(shards_dir)
    urls = storage.glob(storage.join(shards_dir, modality), f"{split}-*.tar")
    if not urls and not allow_empty:
        raise FileNotFoundError(
            f"no {modality} shards for split {split!r} in {storage.join(shards_dir, modality)}; run `tessera data` "
            f"first (or check that the data has {modality} items in the {split} split)"
        )
    for url in urls:
        check_complete(url, shards_dir)
    return urls


# ---------------------------------------------------------------------------------------------------- tar headers
# One walk over a tar's member headers serves both the integrity check (a file, seeking over the data: at a URL only
# the headers are read) and the loader's reader (a shard in memory). Python's tarfile, and so webdataset, reads a tar
# cut at a member boundary, or one with a damaged header, as a shorter valid archive and says nothing; this walk
# insists on the end-of-archive marker and on every header's checksum.
BLOCK = 512  # tar block size
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (0, ord("0"), ord("7"))  # typeflags of regular files ("\0", "0", contiguous "7"), as tarfile's isreg()
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_SPARSE = ord("x"), ord("g"), ord("L"), ord("S")


class CorruptShardError(RuntimeError):
    """A shard that cannot be read; the message names it and the fix."""


class TarDamage(ValueError):
    """What is wrong with a tar, and at which byte (the message); `tar_members` raises it."""


def _number(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal digits (NUL/space padded), or GNU base-256 (first byte 0x80)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarDamage(f"the member header at byte {offset} is damaged (bad {what} field {text[:12]!r})") from None


def _signed_checksum(head: bytes) -> int:
    """The header checksum summed over signed bytes, as some old tar writers did (tarfile accepts it too)."""
    signed = [b - 256 if b >= 128 else b for b in head]
    return sum(signed) - sum(signed[148:156]) + 8 * 32


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """The "LEN key=value\\n" records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        length = data[pos:pos + 20].partition(b" ")[0]
        if not length.isdigit() or int(length) < len(length) + 2:
            raise TarDamage(f"the pax header of the member at byte {offset} is damaged")
        record = data[pos + len(length) + 1:pos + int(length) - 1]
        key, eq, value = record.partition(b"=")
        if not eq:
            raise TarDamage(f"the pax header of the member at byte {offset} is damaged")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += int(length)
    return records


def tar_members(read: Callable[[int, int], bytes], size: int) -> Iterator[tuple[str, int, int]]:
    """(name, start, end) of every regular file of a tar of `size` bytes, in order, through `read(offset, n)`, which
    is asked for headers (and the few bytes of long-name and pax records) only, never for member data.

    ustar and GNU headers, pax (path, size) and GNU long names, octal and base-256 sizes; tarfile's signed or unsigned
    checksums. Links, directories and other non-regular members are skipped, as tarfile's `isreg` skips them. Raises
    TarDamage when a header's checksum or a field is wrong, a member runs past the end, or the archive ends without
    its end-of-archive marker (two zero blocks).
    """
    offset, pax_global, pending = 0, {}, {}
    while True:
        head = read(offset, BLOCK)
        if len(head) < BLOCK:
            raise TarDamage(f"it ends at byte {size} without an end-of-archive marker (truncated)")
        if head == _ZERO_BLOCK:
            if read(offset + BLOCK, BLOCK) == _ZERO_BLOCK:
                return
            raise TarDamage(f"a zero block at byte {offset} is not followed by the end-of-archive marker")
        checksum = _number(head[148:156], "checksum", offset)
        if checksum != sum(head) - sum(head[148:156]) + 8 * 32 and checksum != _signed_checksum(head):
            raise TarDamage(f"the member header at byte {offset} is damaged (bad checksum)")
        flag = head[156]
        length = _number(head[124:136], "size", offset)
        start = offset + BLOCK
        if flag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME):
            data = bytes(read(start, length))
            if len(data) < length:
                raise TarDamage(f"it ends at byte {size} inside the member at byte {offset} (truncated)")
            if flag == _GNU_LONGNAME:
                pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif flag == _PAX:
                pending.update(_pax_records(data, offset))
            else:
                pax_global.update(_pax_records(data, offset))
        else:
            fields = {**pax_global, **pending} if pax_global else pending
            pending = {}
            if "size" in fields:
                length = int(fields["size"])
            if start + length > size:
                raise TarDamage(f"it ends at byte {size} inside the member at byte {offset} (truncated)")
            if flag == _GNU_SPARSE:
                raise TarDamage(f"the member at byte {offset} is a GNU sparse file, which shards never hold")
            if flag in _REGULAR:
                name = fields.get("path")
                if name is None:
                    raw = head[:100].split(b"\0", 1)[0]
                    if head[257:262] == b"ustar" and (prefix := head[345:500].split(b"\0", 1)[0]):
                        raw = prefix + b"/" + raw
                    name = raw.decode("utf-8", "surrogateescape")
                if not (flag == 0 and name.endswith("/")):  # an old-style directory
                    yield name, start, start + length
        offset = start + -(-length // BLOCK) * BLOCK


def check_complete(path: str | Path, rebuild: str | Path | None = None) -> None:
    """Walk a tar's member headers (seeking over the data) to its end-of-archive marker; CorruptShardError naming the
    shard (and `rebuild`, the folder to delete) if it is not intact: cut at a member boundary, or a damaged header.
    Damage inside a member's data shows up when the sample is decoded (tasks/data/loader.py `decode`). At a URL the
    walk reads only the headers (ranged reads where the store has them), in milliseconds per shard."""
    with storage.open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)

        def read(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        try:
            for _ in tar_members(read, size):
                pass
        except TarDamage as exc:
            folder = storage.location(rebuild) if rebuild is not None else "the folder it belongs to"
            raise CorruptShardError(f"shard {path} is truncated or damaged: {exc}; re-run `tessera data` (delete "
                                    f"{folder} to rebuild it)") from None


def read_samples(urls: list[str]):
    """Iterate samples of the given shards in order (no shuffling, no worker split): for preprocessing and tests."""
    if not urls:
        return iter(())
    return iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None))
