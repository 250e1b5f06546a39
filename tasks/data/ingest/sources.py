"""What users bring, as configuration and as a plan: which inputs exist, under which keys, with which label, text,
split and meta. Folders and caption/transcript tables here; users' tar shards in tars.py.

Table paths are relative to the table's own folder unless absolute. A row whose file is also in the folder of the
same modality joins that item (resolved paths compared); any other row is an item of its own. Keys are
f"{img|aud}-{sha1(identity)[:16]}", the identity being the path relative to its source root (folder or table folder).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.infra.common import file_sha256
from tasks.data.ingest.decode import one_line

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
SPLITS = ("train", "val", "test")
STAGE = "ingest"
KEY_HEX = 16


class IngestError(ValueError):
    """A problem with what was passed in (not with one item): one line naming the value and the fix."""


@dataclass(frozen=True)
class Sources:
    images: Path | None = None
    audio: Path | None = None
    captions: Path | None = None
    transcripts: Path | None = None
    shards: tuple[str, ...] = ()  # paths, glob patterns or brace patterns ("data/{00000..00009}.tar")

    def __post_init__(self):
        for name in ("images", "audio", "captions", "transcripts"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                object.__setattr__(self, name, Path(v))
        shards = (self.shards,) if isinstance(self.shards, (str, Path)) else self.shards
        object.__setattr__(self, "shards", tuple(str(s) for s in shards or ()))
        if not (self.images or self.audio or self.captions or self.transcripts or self.shards):
            raise IngestError(
                "no sources given; pass at least one of --images, --audio, --captions, --transcripts, --shards"
            )


@dataclass(frozen=True)
class IngestConfig:
    sample_rate: int = 16000  # Hz, of every audio payload
    caption_path_col: str = "image"
    caption_col: str = "caption"
    transcript_path_col: str = "audio"
    transcript_col: str = "transcript"
    label_col: str = "label"
    min_duration_s: float = 0.05
    max_duration_s: float = 30.0

    def __post_init__(self):
        if self.sample_rate <= 0:
            raise IngestError(f"sample_rate={self.sample_rate} must be > 0; pass --sample-rate HZ, e.g. 16000")
        if not 0 <= self.min_duration_s < self.max_duration_s:
            raise IngestError(
                f"min_duration_s={self.min_duration_s} and max_duration_s={self.max_duration_s} "
                "must satisfy 0 <= min < max"
            )


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
    path: Path | None = None  # read in the worker ...
    data: bytes | None = None  # ... or already in memory (shard member)
    label: str | None = None
    text: str | None = None
    split: str | None = None
    meta: dict = field(default_factory=dict)


def make_key(modality: str, identity: str) -> str:
    """Deterministic, webdataset-safe ([A-Za-z0-9-], no dots) key of a source identity."""
    return f"{_PREFIX[modality]}-{hashlib.sha1(identity.encode()).hexdigest()[:KEY_HEX]}"


def quarantine_entry(source: str, modality: str, reason: str) -> dict:
    return {"source": source, "modality": modality, "reason": reason, "stage": STAGE}


def text_cell(v: Any) -> str | None:
    """A table cell as a string; None for null, NaN and blank."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = v if isinstance(v, str) else str(v)
    return s if s.strip() else None


def jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def parse_split(v: Any, where: str) -> tuple[str | None, str | None]:
    """(split override, error reason): empty -> no override; anything but train/val/test is an error."""
    s = text_cell(v)
    if s is None:
        return None, None
    s = s.strip().lower()
    if s in SPLITS:
        return s, None
    return None, f"invalid split: {where} has split {s!r}; use train, val, test or empty"


def folder_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """Supported files under root, sorted; hidden files and folders skipped, extensions matched case-insensitively."""
    files, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in exts and "." in name:
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def expand_shards(specs: Iterable[str]) -> list[Path]:
    """Shard paths from paths, globs and brace patterns, in the order given (each glob sorted), deduplicated."""
    from braceexpand import braceexpand  # a webdataset dependency

    out: dict[Path, None] = {}
    for spec in specs:
        for pattern in braceexpand(os.path.expanduser(spec)):
            if any(c in pattern for c in "*?["):
                matches = sorted(glob.glob(pattern, recursive=True))
                if not matches:
                    raise IngestError(
                        f"shard pattern {pattern} matches no files; pass --shards with existing .tar files or globs"
                    )
            elif not Path(pattern).is_file():
                raise IngestError(f"shard {pattern} does not exist; pass --shards with existing .tar files or globs")
            else:
                matches = [pattern]
            out.update((Path(m).resolve(), None) for m in matches if Path(m).is_file())
    return list(out)


def check_sources(sources: Sources) -> None:
    """Raise IngestError for a source path that does not exist (before any work)."""
    for kind in KINDS:
        root = getattr(sources, kind.folder)
        if root is not None and not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a folder"
            raise IngestError(
                f"{kind.folder} folder {root} {what}; "
                f"pass --{kind.folder} DIR pointing at root/<class>/*.{kind.exts[0]}"
            )
        table = getattr(sources, kind.table)
        if table is not None and not table.is_file():
            what = "does not exist" if not table.exists() else "is not a file"
            raise IngestError(f"{kind.table} table {table} {what}; pass --{kind.table} FILE (.csv or .parquet)")
    expand_shards(sources.shards)


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def read_table(path: Path, kind: Kind, cfg: IngestConfig) -> list[dict]:
    """A caption/transcript table's rows; IngestError for an unsupported format or missing columns."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            as_text = {c: pa.string() for c in (path_col, text_col, cfg.label_col, "split")}
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=as_text))
        elif suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            fmt = suffix or "(none)"
            raise IngestError(f"{kind.table} table {path} has unsupported format {fmt!r}; use a .csv or .parquet file")
    except (pa.ArrowException, OSError) as err:
        msg = f"cannot read {kind.table} table {path}: {one_line(err)}; check that it is a valid {suffix[1:]} file"
        raise IngestError(msg) from None
    missing = [(c, f) for c, f in ((path_col, kind.path_col), (text_col, kind.text_col)) if c not in table.column_names]
    if missing:
        names = " and ".join(f"{c!r}" for c, _ in missing)
        opts = " / ".join(f"{_option(f)} NAME" for _, f in missing)
        raise IngestError(
            f"{kind.table} table {path} has no {names} column (columns: {', '.join(table.column_names)}); "
            f"name the right column with {opts}"
        )
    return table.to_pylist()


def _plan_table(
    kind: Kind, table_path: Path, cfg: IngestConfig, quarantine: list
) -> dict[Path, tuple[int, dict]]:
    """Resolved file path -> (row number, row) of every usable row; bad and repeated rows are quarantined."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    table_dir = table_path.parent
    rows: dict[Path, tuple[int, dict]] = {}
    for n, row in enumerate(read_table(table_path, kind, cfg), start=1):
        source, noun = f"{table_path}#row{n}", kind.table.rstrip("s")
        value = text_cell(row.get(path_col))
        if value is None:
            reason = f"empty path: {noun} row {n} has no {path_col!r} value"
            quarantine.append(quarantine_entry(source, kind.modality, reason))
            continue
        p = Path(os.path.expanduser(value.strip()))
        file = (p if p.is_absolute() else table_dir / p).resolve()
        if not file.is_file():
            quarantine.append(quarantine_entry(source, kind.modality, f"missing file: {noun} row {n} points at {file}"))
            continue
        if file in rows:
            first = rows[file][0]
            reason = f"duplicate of an earlier row: {noun} row {first} names the same file {file}; keep one per file"
            quarantine.append(quarantine_entry(source, kind.modality, reason))
            continue
        split, err = parse_split(row.get("split"), f"{noun} row {n}")
        if err:
            quarantine.append(quarantine_entry(source, kind.modality, err))
            continue
        extra = {k: jsonable(v) for k, v in row.items() if k not in (path_col, text_col, cfg.label_col, "split")}
        text, label = text_cell(row.get(text_col)), text_cell(row.get(cfg.label_col))
        rows[file] = (n, dict(text=text, label=label, split=split, meta=extra))
    return rows


def plan_kind(kind: Kind, sources: Sources, cfg: IngestConfig, quarantine: list) -> Iterator[Job]:
    """Folder items (joined with their table rows), then the rows whose file is not in the folder."""
    root, table = getattr(sources, kind.folder), getattr(sources, kind.table)
    root = Path(os.path.abspath(root)) if root is not None else None
    rows = _plan_table(kind, table, cfg, quarantine) if table is not None else {}
    if root is not None:
        for f in folder_files(root, kind.exts):
            rel = f.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            key = make_key(kind.modality, f"{kind.folder}:{rel.as_posix()}")
            job = Job(key, kind.modality, str(f), path=f, label=label)
            if (hit := rows.pop(f.resolve(), None)) is not None:
                joined = hit[1]
                job.text, job.split, job.meta = joined["text"], joined["split"], joined["meta"]
                job.label = joined["label"] or label  # an explicit label column wins over the folder name
            yield job
    if rows:
        table_dir = table.parent.resolve()
        for file, (_, r) in sorted(rows.items(), key=lambda kv: kv[1][0]):  # table order
            rel = file.relative_to(table_dir).as_posix() if file.is_relative_to(table_dir) else file.as_posix()
            yield Job(
                make_key(kind.modality, f"{kind.table}:{rel}"), kind.modality, str(file), path=file,
                label=r["label"], text=r["text"], split=r["split"], meta=r["meta"],
            )


def digest_sources(sources: Sources, cfg: IngestConfig) -> str:
    """Content digest of everything ingest would read, for cache keys: (relative name, content sha256) of every
    folder file, each table and each file its rows point at, and each shard. Independent of where the data lives
    and of mtimes, so clones and moved copies agree. Raises IngestError like `ingest` for bad sources."""
    check_sources(sources)
    h = hashlib.sha256()
    memo: dict[Path, str] = {}

    def add(tag: str, name: str, path: Path | None) -> None:
        if path is None:
            sha = "missing"
        else:
            if path not in memo:
                memo[path] = file_sha256(path)
            sha = memo[path]
        h.update(f"{tag}\0{name}\0{sha}\n".encode())

    for kind in KINDS:
        root, table = getattr(sources, kind.folder), getattr(sources, kind.table)
        if root is not None:
            for f in folder_files(root, kind.exts):
                add(kind.folder, f.relative_to(root).as_posix(), f.resolve())
        if table is not None:
            add(kind.table, table.name, table.resolve())
            path_col = getattr(cfg, kind.path_col)
            for row in read_table(table, kind, cfg):
                value = text_cell(row.get(path_col))
                if value is not None:
                    p = Path(os.path.expanduser(value.strip()))
                    file = (p if p.is_absolute() else table.parent / p).resolve()
                    add(f"{kind.table}-file", value, file if file.is_file() else None)
    for shard in expand_shards(sources.shards):
        add("shards", f"{shard.parent.name}/{shard.name}", shard)
    return h.hexdigest()
