"""What users bring, as configuration and as a plan: which inputs exist, under which keys, with which label, text,
split and meta. Folders and the plan of caption/transcript tables here; reading those tables (format, columns, the
files their cells name) in tables.py; users' tar shards in tars.py; what may be read at all (regular files inside
the allowed roots) in inputs.py.

Table paths are relative to the table's own folder unless absolute. A row whose file is also in the folder of the
same modality joins that item (resolved paths compared); any other row is an item of its own. Keys are
f"{img|aud}-{sha1(identity)[:16]}", the identity being the path relative to its source root (folder or table folder;
a table row's file outside the table's folder: its path from there, ../clips/x.wav). So a dataset moved with its table
keeps its keys and the splits they hash to.

Two digests of the inputs:
- `Sources.cache_key()`: the pipeline's cache key for them (tasks/infra/cache.py asks for it). Cheap and opening
  nothing: the (relative path, size, modification time in ns) of every file ingest would read, of each table and of
  every local file a table cell names, and each shard's stamp (inputs.shard_stamp), plus every refusal. A re-run
  with nothing touched is Cached; touching a file re-runs the stage, which then finds its output folder by content.
- `digest_sources(sources, cfg)`: names the output folder. The content (sha256) of every file ingest would read and
  of each table; shards by their stamp (path, size, mtime: reading every shard's bytes would cost too much).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tasks.data.ingest.decode import one_line
from tasks.data.ingest.inputs import (
    STAGE,
    IngestError,
    Ledger,
    Refused,
    expand_shards,
    quarantine_entry,
    roots_of,
    scan_folder,
    sha256_regular,
    shard_stamp,
    stamp,
)
from tasks.data.ingest.tables import _row_file, _table_files, check_columns, read_table  # noqa: F401 (re-export)

__all__ = ["AUDIO_EXTS", "IMAGE_EXTS", "KEY_HEX", "KINDS", "SPLITS", "STAGE", "IngestConfig", "IngestError", "Job",
           "Kind", "Ledger", "Sources", "check_sources", "digest_sources", "jsonable", "make_key", "parse_split",
           "plan_kind", "quarantine_entry", "read_table", "text_cell", "is_split", "ordered_splits", "test_sets"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
SPLITS = ("train", "val", "test")
TEST_SET = re.compile(r"test_[a-z0-9][a-z0-9_]{0,31}")  # more test sets: test_speakers, test_takes, ...
KEY_HEX = 16


def is_split(name: str) -> bool:
    """train, val, test, or a further test set `test_<name>` (evaluated and reported on its own)."""
    return name in SPLITS or TEST_SET.fullmatch(name) is not None


def ordered_splits(names) -> list[str]:
    """The splits among `names` in the order stages go through them: train, val, test, then test_* by name."""
    names = set(names)
    return [s for s in SPLITS if s in names] + sorted(n for n in names if TEST_SET.fullmatch(n))


def test_sets(names) -> list[str]:
    """The test sets among `names`: test first, then test_* by name."""
    return [s for s in ordered_splits(names) if s.startswith("test")]


@dataclass(frozen=True)
class Sources:
    images: Path | None = None
    audio: Path | None = None
    captions: Path | None = None
    transcripts: Path | None = None
    shards: tuple[str, ...] = ()  # paths, globs, brace patterns ("data/{00000..00009}.tar"), fsspec URLs, pipe:CMD
    allow_roots: tuple[str, ...] = ()  # more folders a table row or a symlink may resolve into (absolute paths)

    def __post_init__(self):
        for name in ("images", "audio", "captions", "transcripts"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))
        shards = (self.shards,) if isinstance(self.shards, (str, Path)) else self.shards
        object.__setattr__(self, "shards", tuple(str(s) for s in shards or ()))
        roots = (self.allow_roots,) if isinstance(self.allow_roots, (str, Path)) else self.allow_roots
        object.__setattr__(self, "allow_roots", tuple(os.path.abspath(os.path.expanduser(r)) for r in roots or ()))
        if not (self.images or self.audio or self.captions or self.transcripts or self.shards):
            raise IngestError(
                "no sources given; pass at least one of --images, --audio, --captions, --transcripts, --shards"
            )

    def roots(self) -> tuple[Path, ...]:
        """The allowed roots, resolved: the folders named, the folders of the tables named, and `allow_roots`."""
        tables = (t.parent for t in (self.captions, self.transcripts) if t is not None)
        return roots_of([self.images, self.audio, *tables, *self.allow_roots])

    def cache_key(self) -> str:
        """The pipeline's cache key of these inputs (see the module docstring): stats, opens nothing but folders and
        tables inside the allowed roots, never raises (a bad source fails in the stage, with its message)."""
        h = hashlib.sha256()
        roots, ledger = self.roots(), Ledger()
        h.update(repr(("roots", roots)).encode())
        for kind in KINDS:
            root, table = getattr(self, kind.folder), getattr(self, kind.table)
            if root is not None and root.is_dir():
                for path, real in scan_folder(root, kind.exts, roots, ledger, kind.modality):
                    h.update(repr((kind.folder, path.relative_to(root).as_posix(), stamp(real))).encode())
            if table is not None:
                h.update(repr((kind.table, str(table), stamp(table))).encode())
                for cell, real in _table_files(table, roots):
                    h.update(repr((kind.table, cell, stamp(real))).encode())
        h.update(repr(sorted((e["source"], e["reason"]) for e in ledger.quarantine)).encode())
        h.update(repr(sorted(ledger.skipped.items())).encode())
        try:
            h.update(repr([(why or shard_stamp(loc)) for loc, why in expand_shards(self.shards)]).encode())
        except Exception as err:  # noqa: BLE001 - a missing shard or an unreachable store: the stage says which
            h.update(repr(("shards", one_line(err))).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class IngestConfig:
    sample_rate: int = 16000  # Hz, of every audio payload
    caption_path_col: str = "image"
    caption_col: str = "caption"
    transcript_path_col: str = "audio"
    transcript_col: str = "transcript"
    label_col: str = "label"
    min_duration_s: float = 0.05
    max_duration_s: float = 30.0  # --max-clip-seconds: longer clips are quarantined (checked from the header first)
    max_pixels: int = 40_000_000  # --max-pixels: larger images are quarantined from their header, never decoded
    max_file_bytes: int = 256 << 20  # --max-file-mb: larger files and tar members are quarantined, never read
    decoder_threads: int = 0  # --decoder-threads: 0 = min(4, CPUs)
    name_pattern: str | None = None  # --name-pattern "{label}_{speaker}_{take}": file-name fields into the metadata

    def __post_init__(self):
        if self.sample_rate <= 0:
            raise IngestError(f"sample_rate={self.sample_rate} must be > 0; pass --sample-rate HZ, e.g. 16000")
        if not 0 <= self.min_duration_s < self.max_duration_s:
            raise IngestError(
                f"min_duration_s={self.min_duration_s} and max_duration_s={self.max_duration_s} "
                "must satisfy 0 <= min < max (--max-clip-seconds)"
            )
        for name, low in (("max_pixels", 1), ("max_file_bytes", 1), ("decoder_threads", 0)):
            if getattr(self, name) < low:
                raise IngestError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.name_pattern is not None:
            name_regex(self.name_pattern)  # a malformed pattern fails here, before any work


def name_regex(pattern: str) -> re.Pattern:
    """"{label}_{speaker}_{take}" -> a regex whose named groups are the fields, matching a whole file stem; the
    literal text between fields is matched as written, a field never spans it (shortest match)."""
    parts = re.split(r"\{(\w+)\}", pattern)
    fields = parts[1::2]
    if not fields or len(set(fields)) != len(fields):
        raise IngestError(f"--name-pattern {pattern!r} needs distinct {{field}} names, e.g. '{{label}}_{{speaker}}_{{take}}'")
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(regex + r"\Z")


def name_fields(job: "Job", pattern: str) -> str | None:
    """Fill job.meta (and job.label, from a `label` field, when it has none) from its file name; the reason it
    does not match, else None."""
    stem = Path(job.source).name.split(".", 1)[0]
    m = name_regex(pattern).match(stem)
    if m is None:
        return f"file name does not match --name-pattern: {stem!r} is not {pattern!r}"
    fields = m.groupdict()
    job.meta = {**fields, **job.meta}  # a table's own columns win
    job.label = job.label or fields.get("label")
    return None


@dataclass(frozen=True)
class Kind:
    """How one modality's folder and table are named and described."""

    modality: str
    prefix: str
    exts: tuple[str, ...]
    folder: str  # Sources field and CLI option stem
    table: str
    path_col: str  # IngestConfig field
    text_col: str


KINDS = (
    Kind("image", "img", IMAGE_EXTS, "images", "captions", "caption_path_col", "caption_col"),
    Kind("audio", "aud", AUDIO_EXTS, "audio", "transcripts", "transcript_path_col", "transcript_col"),
)
MODALITY_OF_EXT = {**{e: "image" for e in IMAGE_EXTS}, **{e: "audio" for e in AUDIO_EXTS}}
_PREFIX = {k.modality: k.prefix for k in KINDS}


@dataclass
class Job:
    key: str
    modality: str
    source: str
    path: Path | None = None  # resolved and checked; read in the worker ...
    data: bytes | None = None  # ... or already in memory (shard member)
    label: str | None = None
    text: str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)


def make_key(modality: str, identity: str) -> str:
    """Deterministic, webdataset-safe ([A-Za-z0-9-], no dots) key of a source identity."""
    return f"{_PREFIX[modality]}-{hashlib.sha1(identity.encode()).hexdigest()[:KEY_HEX]}"


def text_cell(v: Any) -> str | None:
    """A table cell as a string; None for null, NaN and blank."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = v if isinstance(v, str) else str(v)
    return s if s.strip() else None


def jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def parse_split(v: Any, where: str) -> tuple[str | None, str | None]:
    """(split override, error reason): empty -> no override; anything but train/val/test/test_<name> is an error."""
    s = text_cell(v)
    if s is None:
        return None, None
    s = s.strip().lower()
    if is_split(s):
        return s, None
    return None, f"invalid split: {where} has split {s!r}; use train, val, test, test_<name> or empty"


def check_sources(sources: Sources) -> None:
    """Raise IngestError for a source path that does not exist or is not what it should be (before any work)."""
    for kind in KINDS:
        root = getattr(sources, kind.folder)
        if root is not None and not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a folder"
            raise IngestError(
                f"{kind.folder} folder {root} {what}; "
                f"pass --{kind.folder} DIR pointing at root/<class>/*.{kind.exts[0]}"
            )
        table = getattr(sources, kind.table)
        if table is not None and not table.is_file():  # stat: a FIFO or device named as a table is never opened
            what = "does not exist" if not table.exists() else "is not a regular file"
            raise IngestError(f"{kind.table} table {table} {what}; pass --{kind.table} FILE (.csv or .parquet)")
    expand_shards(sources.shards)


def check_table(path: Path, kind: Kind, cfg: IngestConfig) -> None:
    """Before any stage runs: the table reads, has its columns (`check_columns`) and every split value is valid;
    IngestError (one line naming the row and the fix) otherwise."""
    rows = read_table(path, kind, cfg, bad_rows=[])
    for n, row in enumerate(rows, start=1):
        if (why := parse_split(row.get("split"), f"{kind.table.rstrip('s')} row {n}")[1]) is not None:
            raise IngestError(f"{kind.table} table {path}: {why}")


def group_values(sources: Sources, cfg: IngestConfig, field_name: str) -> set[str] | None:
    """The values of a --split-by field, found before ingest decodes anything: from the tables' columns, the
    --name-pattern fields of file names, and (for `label`) the class folders. None when some items' values cannot
    be known up front (webdataset shards)."""
    if sources.shards:
        return None
    values: set[str] = set()
    pattern = name_regex(cfg.name_pattern) if cfg.name_pattern else None
    for kind in KINDS:
        root, table = getattr(sources, kind.folder), getattr(sources, kind.table)
        if table is not None:
            values |= {str(r[field_name]) for r in read_table(table, kind, cfg, bad_rows=[])
                       if text_cell(r.get(field_name)) is not None}
        for dirpath, dirs, files in os.walk(root) if root is not None else ():
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root).parts
            rel = rel[1:] if rel and is_split(rel[0]) else rel
            for f in (f for f in files if f.rsplit(".", 1)[-1].lower() in kind.exts):
                m = pattern.match(f.split(".", 1)[0]) if pattern else None
                if m and field_name in m.groupdict():
                    values.add(m[field_name])
                elif field_name == cfg.label_col and rel:
                    values.add(rel[0])
    return values


def _plan_table(
    kind: Kind, table_path: Path, cfg: IngestConfig, roots: tuple[Path, ...], ledger: Ledger
) -> dict[Path, tuple[int, dict]]:
    """Resolved file path -> (row number, row) of every usable row; bad and repeated rows are quarantined."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    noun, bad_rows = kind.table.rstrip("s"), []
    rows: dict[Path, tuple[int, dict]] = {}
    for n, row in enumerate(read_table(table_path, kind, cfg, bad_rows), start=1):
        source = f"{table_path}#row{n}"
        value = text_cell(row.get(path_col))
        if value is None:
            ledger.refuse(source, kind.modality, f"empty path: {noun} row {n} has no {path_col!r} value")
            continue
        try:
            file = _row_file(value.strip(), table_path.parent, roots, f"{noun} row {n}")
        except Refused as why:
            ledger.refuse(source, kind.modality, str(why))
            continue
        if file in rows:
            first = rows[file][0]
            reason = f"duplicate of an earlier row: {noun} row {first} names the same file {file}; keep one per file"
            ledger.refuse(source, kind.modality, reason)
            continue
        split, err = parse_split(row.get("split"), f"{noun} row {n}")
        if err:
            ledger.refuse(source, kind.modality, err)
            continue
        extra = {k: jsonable(v) for k, v in row.items() if k not in (path_col, text_col, cfg.label_col, "split")}
        text, label = text_cell(row.get(text_col)), text_cell(row.get(cfg.label_col))
        if text is None:
            ledger.skipped[f"empty {noun} (the file lands without one)"] += 1
        rows[file] = (n, dict(text=text, label=label, split=split, meta=extra))
    for i, bad in enumerate(bad_rows, start=1):
        ledger.refuse(f"{table_path}#malformed{i}", kind.modality, f"malformed {noun} row: {bad}")
    return rows


def plan_kind(kind: Kind, sources: Sources, cfg: IngestConfig, ledger: Ledger) -> Iterator[Job]:
    """Folder items (joined with their table rows), then the rows whose file is not in the folder."""
    root, table = getattr(sources, kind.folder), getattr(sources, kind.table)
    root = Path(os.path.abspath(root)) if root is not None else None
    roots = sources.roots()
    rows = _plan_table(kind, table, cfg, roots, ledger) if table is not None else {}
    if root is not None:
        for f, real in scan_folder(root, kind.exts, roots, ledger, kind.modality):
            rel = f.relative_to(root)
            split, parts = (rel.parts[0], rel.parts[1:]) if is_split(rel.parts[0]) and len(rel.parts) > 2 else \
                (None, rel.parts)  # root/<split>/<class>/file: the folder names the split
            label = parts[0] if len(parts) > 1 else None
            key = make_key(kind.modality, f"{kind.folder}:{rel.as_posix()}")
            job = Job(key, kind.modality, str(f), path=real, label=label, split=split)
            if (hit := rows.pop(real, None)) is not None:
                joined = hit[1]
                job.text, job.split, job.meta = joined["text"], joined["split"] or job.split, joined["meta"]
                job.label = joined["label"] or label  # an explicit label column wins over the folder name
            yield job
    if rows:
        table_dir = table.parent.resolve()
        for file, (_, r) in sorted(rows.items(), key=lambda kv: kv[1][0]):  # table order
            rel = Path(os.path.relpath(file, table_dir)).as_posix()  # ../x.png beside it: a moved tree keys alike
            yield Job(
                make_key(kind.modality, f"{kind.table}:{rel}"), kind.modality, str(file), path=file,
                label=r["label"], text=r["text"], split=r["split"], meta=r["meta"],
            )


def digest_sources(sources: Sources, cfg: IngestConfig) -> str:
    """Digest of everything ingest would read, naming its output folder: (key, content sha256, label, text, split,
    meta) of every folder and table item, each table's content, every refusal, and each shard's stamp (path, size,
    mtime). Independent of where folders and tables live and of their mtimes, so clones and moved copies agree.
    Reads only what ingest would read. Raises IngestError like `ingest` for bad sources."""
    check_sources(sources)
    h, ledger = hashlib.sha256(), Ledger()
    for kind in KINDS:
        table = getattr(sources, kind.table)
        if table is not None:
            h.update(f"{kind.table}\0{table.name}\0{sha256_regular(table)}\n".encode())
        for job in plan_kind(kind, sources, cfg, ledger):
            try:
                sha = sha256_regular(job.path)
            except (Refused, OSError) as err:
                sha = f"unreadable:{one_line(err)}"
            fields = (job.key, sha, job.label, job.text, job.split, json.dumps(job.meta, sort_keys=True, default=str))
            h.update(json.dumps(fields).encode() + b"\n")
    h.update(json.dumps(sorted((e["source"], e["reason"]) for e in ledger.quarantine)).encode())
    h.update(json.dumps(sorted(ledger.skipped.items())).encode())
    for loc, why in expand_shards(sources.shards):
        h.update(f"shard\0{why or shard_stamp(loc)}\n".encode())
    return h.hexdigest()
