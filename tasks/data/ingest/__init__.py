"""Ingest: turn what users bring into one validated items table.

Sources (any mix, at least one):
    images       root/<class>/*.{png,jpg,jpeg,webp}      label = the class folder's name
    audio        root/<class>/*.{wav,flac,ogg,mp3}
    captions     CSV/Parquet: image path + caption (+ label, split, any other column -> meta)
    transcripts  CSV/Parquet: audio path + transcript (same rules)
    shards       webdataset tars in img2dataset's layout: key.jpg|png|webp (or an audio file), key.txt, key.json;
                 local paths, globs, brace patterns, fsspec URLs or pipe:COMMAND

Table paths are relative to the table's own folder unless absolute. A row whose file is also in the folder of the
same modality joins that item (resolved paths compared); any other row is an item of its own.

What may be read at all (inputs.py): only regular files (special files are refused by stat, never opened), inside
the allowed roots (the folders named, the tables' folders, --allow-root), no URL from a table; tar members with
absolute or '..' names, links, split samples and oversized members refuse their sample (tars.py). Limits: max clip
seconds, max pixels (checked from the header), max file bytes, decoder threads (IngestConfig).

Every file is decoded once. Images become RGB (alpha composited on white); an RGB PNG/JPEG/WebP keeps its bytes,
anything else is re-encoded as PNG. Audio becomes mono float32 resampled to `sample_rate` and is stored as 16-bit
WAV. What fails (empty, undecodable, truncated, NaN, too short or long, too large, missing file, special file,
outside the roots, duplicate, corrupt shard) goes to the quarantine table with a one-sentence reason; what is passed
over on purpose (other extensions, hidden folders, empty captions) is counted by reason in summary.json's
"skipped"; nothing fails silently and nothing crashes the run.

Output (written into a temporary sibling, renamed when complete):
    items.parquet       ITEMS_SCHEMA, one row per item, sorted by key
    quarantine.parquet  QUARANTINE_SCHEMA, possibly empty
    summary.json        counts, quarantine reasons histogram, skipped counts, allowed roots, digest
    _SUCCESS            the record `ingest` returns (a finished directory is reused as is)

Keys are f"{img|aud}-{sha1(identity)[:16]}" where the identity is the path relative to its source root (folder or
table folder) or "<shard folder>/<shard name>#<member key>": moving the dataset keeps every key, adding files
changes none.

    inputs.py   what may be read: regular files inside the allowed roots, folder search, shard locations; Ledger
    sources.py  IngestConfig, Sources (and its cache key), IngestError; the plan of folders and tables; digest_sources
    tables.py   caption/transcript tables as read: format, columns, rows, the files their cells name
    tars.py     users' tar shards
    decode.py   decode_image, decode_audio: one input each
    here        the decoding thread pool, the items and quarantine tables, `ingest`
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.infra.common import atomic_dir, progress, read_success, sha256_bytes, write_json
from tasks.data.ingest.decode import DecodeError, Decoded, decode_audio, decode_image, one_line
from tasks.data.ingest.inputs import Ledger, Refused, quarantine_entry, read_regular
from tasks.data.ingest.sources import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    KEY_HEX,
    KINDS,
    SPLITS,
    STAGE,
    IngestConfig,
    IngestError,
    Job,
    Sources,
    check_sources,
    digest_sources,
    jsonable,
    make_key,
    name_fields,
    plan_kind,
    read_table,
)
from tasks.data.ingest.tars import SHARD_ERROR, plan_shards, read_shard

__all__ = [
    "AUDIO_EXTS", "IMAGE_EXTS", "ITEMS_SCHEMA", "KEY_HEX", "QUARANTINE_SCHEMA", "SHARD_ERROR", "SPLITS", "STAGE",
    "DecodeError", "Decoded", "IngestConfig", "IngestError", "IngestResult", "Sources", "check_sources",
    "decode_audio", "decode_image", "digest_sources", "ingest", "make_key", "read_shard", "read_table",
]

WORKERS = min(4, os.cpu_count() or 1)  # default decode threads: PIL, libsndfile and torch release the GIL
IN_FLIGHT_PER_THREAD = 4  # jobs submitted ahead of the one being collected: bounds memory, keeps order
ROW_GROUP_ROWS = 512
ROW_GROUP_BYTES = 64 << 20

ITEMS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("modality", pa.string()),  # "image" | "audio"
        ("label", pa.string()),
        ("text", pa.string()),  # caption or transcript
        ("source", pa.string()),  # file path, or "<shard path>#<member key>"
        ("payload", pa.binary()),
        ("payload_ext", pa.string()),  # png | jpg | webp | wav
        ("sha256", pa.string()),  # of payload
        ("nbytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("duration_s", pa.float32()),
        ("split", pa.string()),  # train | val | test override, or null
        ("meta", pa.string()),  # JSON object, sorted keys
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [("source", pa.string()), ("modality", pa.string()), ("reason", pa.string()), ("stage", pa.string())]
)


@dataclass(frozen=True)
class IngestResult:
    items_path: Path
    quarantine_path: Path
    n_items: dict[str, int]  # per modality
    n_quarantined: int
    digest: str  # of the item rows (key, sha256, label, text, split, meta), not of the Parquet bytes
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reasons by kind
    skipped: dict[str, int] = field(default_factory=dict)  # passed over on purpose, by reason
    changes: dict[str, int] = field(default_factory=dict)  # items changed on the way in (resampled, ...), by kind


# ---------------------------------------------------------------------------------------------------------------
# Planning: every input once.


def _plan(sources: Sources, cfg: IngestConfig, ledger: Ledger) -> Iterator[Job]:
    """Every input once, in a deterministic order; duplicates of an earlier key are quarantined here."""
    seen: dict[str, str] = {}
    kinds = (plan_kind(kind, sources, cfg, ledger) for kind in KINDS)
    for job in itertools.chain(*kinds, plan_shards(sources, cfg, ledger)):
        if cfg.name_pattern and (why := name_fields(job, cfg.name_pattern)):
            ledger.refuse(job.source, job.modality, why)
            continue
        if job.key in seen:
            reason = f"duplicate of an earlier item: same key {job.key} as {seen[job.key]}"
            ledger.refuse(job.source, job.modality, reason)
            continue
        seen[job.key] = job.source
        yield job


# ---------------------------------------------------------------------------------------------------------------
# Decoding in a small thread pool, results in submission order.


def _run(job: Job, cfg: IngestConfig) -> Decoded | dict:
    try:
        data = job.data if job.data is not None else read_regular(job.path, cfg.max_file_bytes)
    except Refused as why:
        return quarantine_entry(job.source, job.modality, str(why))
    except OSError as err:
        return quarantine_entry(job.source, job.modality, f"cannot read file: {err.strerror or one_line(err)}")
    try:
        return decode_image(data, cfg.max_pixels) if job.modality == "image" else decode_audio(data, cfg)
    except DecodeError as err:
        return quarantine_entry(job.source, job.modality, str(err))


def _decode_in_order(jobs: Iterable[Job], cfg: IngestConfig) -> Iterator[tuple[Job, Decoded | dict]]:
    threads = cfg.decoder_threads or WORKERS
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ingest")
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append((job, pool.submit(_run, job, cfg)))
            if len(pending) >= IN_FLIGHT_PER_THREAD * threads:
                j, fut = pending.popleft()
                yield j, fut.result()
        while pending:
            j, fut = pending.popleft()
            yield j, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _row_digest_update(h, row: dict) -> None:
    h.update(json.dumps([row[c] for c in ("key", "sha256", "label", "text", "split", "meta")]).encode() + b"\n")


def _write_items(path: Path, rows: list[dict], spool) -> str:
    """Rows (sorted by key; payloads at spool offsets) into Parquet in bounded row groups; return the row digest."""
    h = hashlib.sha256()
    with pq.ParquetWriter(path, ITEMS_SCHEMA) as writer:
        batch: list[dict] = []
        size = 0
        for row in rows:
            spool.seek(row["offset"])
            payload = spool.read(row["nbytes"])
            batch.append({**{c: row.get(c) for c in ITEMS_SCHEMA.names}, "payload": payload})
            _row_digest_update(h, row)
            size += len(payload)
            if len(batch) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_pylist(batch, schema=ITEMS_SCHEMA))
                batch, size = [], 0
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=ITEMS_SCHEMA))
    return h.hexdigest()


def _write_quarantine(path: Path, entries: list[dict]) -> None:
    entries = sorted(entries, key=lambda q: (q["modality"], q["source"], q["reason"]))
    pq.write_table(pa.Table.from_pylist(entries, schema=QUARANTINE_SCHEMA), path)


def _reasons(entries: list[dict]) -> dict[str, int]:
    """Histogram of reason kinds: the text before the first ':' (details such as paths come after it)."""
    return dict(sorted(Counter(q["reason"].split(":", 1)[0] for q in entries).items()))


def _result(out_dir: Path, record: dict) -> IngestResult:
    return IngestResult(
        items_path=out_dir / record["items"],
        quarantine_path=out_dir / record["quarantine"],
        n_items=dict(record["n_items"]),
        n_quarantined=int(record["n_quarantined"]),
        digest=record["digest"],
        reasons=dict(record.get("reasons", {})),
        skipped=dict(record.get("skipped", {})),
        changes=dict(record.get("changes", {})),
    )


def changes(rows: list[dict], cfg: IngestConfig) -> dict[str, int]:
    """What ingest changed in the items it kept, counted by kind (from what decoding measured): audio resampled or
    mixed to mono, images converted to RGB or re-encoded as PNG. Nothing changes silently."""
    counts: Counter = Counter()
    for r in rows:
        m = json.loads(r["meta"])
        if r["modality"] == "audio":
            if m.get("orig_sample_rate") not in (None, cfg.sample_rate):
                counts[f"audio resampled {m['orig_sample_rate']} Hz -> {cfg.sample_rate} Hz"] += 1
            if (m.get("channels") or 1) > 1:
                counts[f"audio mixed from {m['channels']} channels to mono"] += 1
        elif m.get("orig_mode") not in (None, "RGB"):
            counts[f"image converted from {m['orig_mode']} to RGB"] += 1
        elif r["payload_ext"] == "png" and m.get("orig_format") not in (None, "PNG", "JPEG", "WEBP"):
            counts[f"image re-encoded from {m['orig_format']} as PNG"] += 1
    return dict(sorted(counts.items()))


def _collect(sources: Sources, cfg: IngestConfig, ledger: Ledger, spool) -> list[dict]:
    """Plan, decode and validate every input; payloads into `spool`, failures into the ledger; the rows, minus
    those taken back after they were planned (split tar samples), in no particular order."""
    rows: list[dict] = []
    for job, res in progress(_decode_in_order(_plan(sources, cfg, ledger), cfg), desc="ingest", unit="file"):
        if isinstance(res, dict):
            ledger.quarantine.append(res)
            continue
        offset = spool.tell()
        spool.write(res.payload)
        meta = {**{k: jsonable(v) for k, v in job.meta.items()}, **res.meta}
        rows.append(dict(
            key=job.key, modality=job.modality, label=job.label, text=job.text, source=job.source,
            payload_ext=res.ext, sha256=sha256_bytes(res.payload), nbytes=len(res.payload), width=res.width,
            height=res.height, duration_s=res.duration_s, split=job.split,
            meta=json.dumps(meta, sort_keys=True, default=str), offset=offset,
        ))
    return [r for r in rows if r["key"] not in ledger.retracted]


def _no_items(out_dir: Path, quarantine: list[dict], n_inputs: int) -> IngestError:
    failed = out_dir.parent / f"{out_dir.name}.quarantine.parquet"
    _write_quarantine(failed, quarantine)
    common = Counter(q["reason"] for q in quarantine).most_common(1)
    why = f" (most common: {common[0][0]!r} x{common[0][1]})" if common else ""
    return IngestError(f"no valid items: 0 of {n_inputs} files decoded{why}; see quarantine at {failed}")


def ingest(sources: Sources, cfg: IngestConfig, out_dir: Path) -> IngestResult:
    """Decode and validate every input once; write items.parquet, quarantine.parquet and summary.json atomically.

    A finished `out_dir` (with `_SUCCESS`) is returned as is. Raises IngestError for a missing source, a table
    without its columns, an unsupported table format, or when nothing valid is left.
    """
    out_dir = Path(out_dir)
    if (record := read_success(out_dir)) is not None:
        return _result(out_dir, record)
    check_sources(sources)
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        ledger = Ledger()
        spool_path = tmp / ".payloads.spool"  # payloads wait here (not in memory) until rows are sorted by key
        with open(spool_path, "w+b") as spool:
            rows = _collect(sources, cfg, ledger, spool)
            quarantine = ledger.quarantine
            n_inputs = len(rows) + sum(not q["reason"].startswith(SHARD_ERROR) for q in quarantine)
            if not rows:
                raise _no_items(out_dir, quarantine, n_inputs)
            rows.sort(key=lambda r: r["key"])
            row_digest = _write_items(tmp / "items.parquet", rows, spool)
        spool_path.unlink()
        _write_quarantine(tmp / "quarantine.parquet", quarantine)
        n_items = {k.modality: sum(r["modality"] == k.modality for r in rows) for k in KINDS}
        reasons, skipped, changed = _reasons(quarantine), dict(sorted(ledger.skipped.items())), changes(rows, cfg)
        write_json(tmp / "summary.json", {
            "n_items": n_items, "n_inputs": n_inputs, "n_quarantined": len(quarantine), "reasons": reasons,
            "skipped": skipped, "changes": changed, "allowed_roots": [str(r) for r in sources.roots()],
            "digest": row_digest, "config": asdict(cfg),
        })
        record.update(
            items="items.parquet", quarantine="quarantine.parquet", summary="summary.json", n_items=n_items,
            n_quarantined=len(quarantine), digest=row_digest, reasons=reasons, skipped=skipped, changes=changed,
        )
    return _result(out_dir, record)
