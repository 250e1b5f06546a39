"""Ingest: turn what users bring into one validated items table.

Sources (any mix, at least one):
    images       root/<class>/*.{png,jpg,jpeg,webp}      label = the class folder's name
    audio        root/<class>/*.{wav,flac,ogg,mp3}
    captions     CSV/Parquet: image path + caption (+ label, split, any other column -> meta)
    transcripts  CSV/Parquet: audio path + transcript (same rules)
    shards       webdataset tars in img2dataset's layout: key.jpg|png|webp (or an audio file), key.txt, key.json

Table paths are relative to the table's own folder unless absolute. A row whose file is also in the folder of the
same modality joins that item (resolved paths compared); any other row is an item of its own.

Every file is decoded once. Images become RGB (alpha composited on white); an RGB PNG/JPEG/WebP keeps its bytes,
anything else is re-encoded as PNG. Audio becomes mono float32 resampled to `sample_rate` and is stored as 16-bit
WAV. What fails (empty, undecodable, truncated, NaN, too short or long, missing file, duplicate, corrupt shard) goes
to the quarantine table with a one-sentence reason; nothing fails silently and nothing crashes the run.

Output (written into a temporary sibling, renamed when complete):
    items.parquet       ITEMS_SCHEMA, one row per item, sorted by key
    quarantine.parquet  QUARANTINE_SCHEMA, possibly empty
    summary.json        counts, reasons histogram, digest
    _SUCCESS            the record `ingest` returns (a finished directory is reused as is)

Keys are f"{img|aud}-{sha1(identity)[:16]}" where the identity is the path relative to its source root (folder or
table folder) or "<shard folder>/<shard name>#<member key>": moving the dataset keeps every key, adding files
changes none.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import tarfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from tasks.common import atomic_dir, file_sha256, progress, read_success, sha256_bytes, write_json

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
SPLITS = ("train", "val", "test")
STAGE = "ingest"
SHARD_ERROR = "tar shard is"  # how a whole-shard quarantine reason starts (the shard, not one input)
WORKERS = min(4, os.cpu_count() or 1)  # decode threads: PIL, libsndfile and torch release the GIL while they work
IN_FLIGHT = 4 * WORKERS  # jobs submitted ahead of the one being collected: bounds memory, keeps order
ROW_GROUP_ROWS = 512
ROW_GROUP_BYTES = 64 << 20
KEY_HEX = 16

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
class IngestResult:
    items_path: Path
    quarantine_path: Path
    n_items: dict[str, int]  # per modality
    n_quarantined: int
    digest: str  # of the item rows (key, sha256, label, text, split, meta), not of the Parquet bytes


# ---------------------------------------------------------------------------------------------------------------
# Decoding: bytes in, validated payload out. Raises DecodeError with a one-sentence reason.


class DecodeError(Exception):
    pass


@dataclass(frozen=True)
class Decoded:
    payload: bytes
    ext: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    meta: dict = field(default_factory=dict)  # what decoding measured (original mode, rate, channels)


_KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _clean(err: BaseException) -> str:
    """An exception as one short line, without '<_io.BytesIO object at 0x...>' noise."""
    msg = re.sub(r"\s*'?<_io\.\w+ object at 0x[0-9a-fA-F]+>'?", "", str(err)) or type(err).__name__
    return " ".join(msg.split()).rstrip(".")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha (or a transparent palette entry) composited on white, 16-bit scaled to 8-bit."""
    if im.mode in _HIGH_BIT_MODES:
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes) -> Decoded:
    """Decode fully (a truncated file fails here); keep an RGB PNG/JPEG/WebP's bytes, else re-encode as PNG."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt, mode = im.format, im.mode
            if fmt in _KEEP_FORMATS and mode == "RGB" and "transparency" not in im.info:
                payload, ext, size = data, _KEEP_FORMATS[fmt], im.size
            else:
                rgb = _to_rgb(im)
                buf = io.BytesIO()
                rgb.save(buf, format="PNG")
                payload, ext, size = buf.getvalue(), "png", rgb.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad input
        raise DecodeError(f"cannot decode image: {_clean(err)}") from None
    return Decoded(payload, ext, width=size[0], height=size[1], meta={"orig_format": fmt, "orig_mode": mode})


_DATA_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _truncation(fmt: str, declared: int, got: int, info: str) -> str | None:
    """Why a decoded stream is shorter than its header says, or None. libsndfile reads a cut WAV without error
    (it only notes 'data : N (should be M)' in its log), and a cut MP3 reads fewer frames than its header declares."""
    m = _DATA_CHUNK.search(info)
    if m and int(m.group(2)) < int(m.group(1)):
        return f"truncated audio file: header declares {m.group(1)} data bytes, file holds {m.group(2)}"
    slack = max(1152, declared // 100) if fmt == "MP3" else 0  # MP3 headers may only estimate the length
    if declared > 0 and got < declared - slack:
        return f"truncated audio file: header declares {declared} frames, decoded {got}"
    return None


def decode_audio(data: bytes, cfg: IngestConfig) -> Decoded:
    """Decode with soundfile, mix to mono, resample to cfg.sample_rate; payload = 16-bit PCM WAV."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, declared, fmt = f.samplerate, f.channels, f.frames, f.format
            if declared > 0 and declared / sr > cfg.max_duration_s:  # don't decode an hour to reject it
                raise DecodeError(f"audio too long: {declared / sr:.3f} s > max_duration_s={cfg.max_duration_s}")
            x = f.read(dtype="float32", always_2d=True)  # (n_frames, channels)
            info = f.extra_info
    except DecodeError:
        raise
    except Exception as err:  # libsndfile errors, bad headers
        raise DecodeError(f"cannot decode audio: {_clean(err)}") from None
    if reason := _truncation(fmt, declared, x.shape[0], info):
        raise DecodeError(reason)
    if not np.isfinite(x).all():
        raise DecodeError("audio contains NaN or infinite samples")
    duration = x.shape[0] / sr
    if duration < cfg.min_duration_s:
        raise DecodeError(f"audio too short: {duration:.3f} s < min_duration_s={cfg.min_duration_s}")
    if duration > cfg.max_duration_s:
        raise DecodeError(f"audio too long: {duration:.3f} s > max_duration_s={cfg.max_duration_s}")
    mono = x.mean(axis=1)  # (n_frames,)
    if sr != cfg.sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), sr, cfg.sample_rate).numpy()
    mono = np.clip(mono, -1.0, 1.0)  # resampling can overshoot; PCM_16 would wrap
    buf = io.BytesIO()
    sf.write(buf, mono, cfg.sample_rate, format="WAV", subtype="PCM_16")
    meta = {"orig_sample_rate": sr, "channels": channels, "orig_format": fmt}
    return Decoded(buf.getvalue(), "wav", duration_s=len(mono) / cfg.sample_rate, meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# Planning: which inputs exist, under which keys, with which label/text/split/meta. Runs in the main thread.


@dataclass(frozen=True)
class _Kind:
    """How one modality's folder and table are named and described."""

    modality: str
    prefix: str
    exts: tuple[str, ...]
    folder: str  # Sources field and CLI option stem
    table: str
    path_col: str  # IngestConfig field
    text_col: str


KINDS = (
    _Kind("image", "img", IMAGE_EXTS, "images", "captions", "caption_path_col", "caption_col"),
    _Kind("audio", "aud", AUDIO_EXTS, "audio", "transcripts", "transcript_path_col", "transcript_col"),
)
_MODALITY_OF_EXT = {**{e: "image" for e in IMAGE_EXTS}, **{e: "audio" for e in AUDIO_EXTS}}
_PREFIX = {k.modality: k.prefix for k in KINDS}


@dataclass
class _Job:
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


def _quarantine(source: str, modality: str, reason: str) -> dict:
    return {"source": source, "modality": modality, "reason": reason, "stage": STAGE}


def _text(v: Any) -> str | None:
    """A table cell as a string; None for null, NaN and blank."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = v if isinstance(v, str) else str(v)
    return s if s.strip() else None


def _jsonable(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _split(v: Any, where: str) -> tuple[str | None, str | None]:
    """(split override, error reason): empty -> no override; anything but train/val/test is an error."""
    s = _text(v)
    if s is None:
        return None, None
    s = s.strip().lower()
    if s in SPLITS:
        return s, None
    return None, f"invalid split: {where} has split {s!r}; use train, val, test or empty"


def _folder_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
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


def _expand_shards(specs: Iterable[str]) -> list[Path]:
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
    _expand_shards(sources.shards)


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def read_table(path: Path, kind: _Kind, cfg: IngestConfig) -> list[dict]:
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
        msg = f"cannot read {kind.table} table {path}: {_clean(err)}; check that it is a valid {suffix[1:]} file"
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
    kind: _Kind, table_path: Path, cfg: IngestConfig, quarantine: list
) -> dict[Path, tuple[int, dict]]:
    """Resolved file path -> (row number, row) of every usable row; bad and repeated rows are quarantined."""
    path_col, text_col = getattr(cfg, kind.path_col), getattr(cfg, kind.text_col)
    table_dir = table_path.parent
    rows: dict[Path, tuple[int, dict]] = {}
    for n, row in enumerate(read_table(table_path, kind, cfg), start=1):
        source, noun = f"{table_path}#row{n}", kind.table.rstrip("s")
        value = _text(row.get(path_col))
        if value is None:
            reason = f"empty path: {noun} row {n} has no {path_col!r} value"
            quarantine.append(_quarantine(source, kind.modality, reason))
            continue
        p = Path(os.path.expanduser(value.strip()))
        file = (p if p.is_absolute() else table_dir / p).resolve()
        if not file.is_file():
            quarantine.append(_quarantine(source, kind.modality, f"missing file: {noun} row {n} points at {file}"))
            continue
        if file in rows:
            first = rows[file][0]
            reason = f"duplicate of an earlier row: {noun} row {first} names the same file {file}; keep one per file"
            quarantine.append(_quarantine(source, kind.modality, reason))
            continue
        split, err = _split(row.get("split"), f"{noun} row {n}")
        if err:
            quarantine.append(_quarantine(source, kind.modality, err))
            continue
        extra = {k: _jsonable(v) for k, v in row.items() if k not in (path_col, text_col, cfg.label_col, "split")}
        text, label = _text(row.get(text_col)), _text(row.get(cfg.label_col))
        rows[file] = (n, dict(text=text, label=label, split=split, meta=extra))
    return rows


def _plan_kind(kind: _Kind, sources: Sources, cfg: IngestConfig, quarantine: list) -> Iterator[_Job]:
    """Folder items (joined with their table rows), then the rows whose file is not in the folder."""
    root, table = getattr(sources, kind.folder), getattr(sources, kind.table)
    root = Path(os.path.abspath(root)) if root is not None else None
    rows = _plan_table(kind, table, cfg, quarantine) if table is not None else {}
    if root is not None:
        for f in _folder_files(root, kind.exts):
            rel = f.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            key = make_key(kind.modality, f"{kind.folder}:{rel.as_posix()}")
            job = _Job(key, kind.modality, str(f), path=f, label=label)
            if (hit := rows.pop(f.resolve(), None)) is not None:
                joined = hit[1]
                job.text, job.split, job.meta = joined["text"], joined["split"], joined["meta"]
                job.label = joined["label"] or label  # an explicit label column wins over the folder name
            yield job
    if rows:
        table_dir = table.parent.resolve()
        for file, (_, r) in sorted(rows.items(), key=lambda kv: kv[1][0]):  # table order
            rel = file.relative_to(table_dir).as_posix() if file.is_relative_to(table_dir) else file.as_posix()
            yield _Job(
                make_key(kind.modality, f"{kind.table}:{rel}"), kind.modality, str(file), path=file,
                label=r["label"], text=r["text"], split=r["split"], meta=r["meta"],
            )


# webdataset's rule: key = member name up to the first dot after the last '/', extension = the rest
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")


class _ShardError(Exception):
    def __init__(self, reason: str, partial: str | None):
        super().__init__(reason)
        self.reason, self.partial = reason, partial


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order, streaming. Raises _ShardError at a corrupt or truncated point,
    after yielding every sample completed before it (`partial` names the sample that was being read)."""
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                m = _MEMBER.match(info.name.removeprefix("./"))
                if not info.isfile() or m is None:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                members[ext] = tf.extractfile(info).read()
            end = tf.offset  # where the header that ended the stream starts
        if not _is_compressed(path):  # tarfile stops quietly at a cut header: require the end-of-archive block
            with open(path, "rb") as f:
                f.seek(end)
                if f.read(512) != b"\0" * 512:
                    raise _ShardError("tar shard is truncated: it ends without the end-of-archive marker", current)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise _ShardError(f"tar shard is corrupt or truncated: {_clean(err)}", current) from None
    if current is not None:
        yield current, members


def _shard_job(shard: Path, key: str, members: dict[str, bytes], cfg: IngestConfig) -> _Job | dict:
    """One sample's job, or its quarantine entry (no media member, unreadable json, bad split)."""
    source = f"{shard}#{key}"
    media = [e for e in (*IMAGE_EXTS, *AUDIO_EXTS) if e in members]
    if not media:
        found = ", ".join(sorted(members)) or "nothing"
        return _quarantine(source, "shard", f"no image or audio member: the sample has only {found}")
    ext = media[0]
    modality = _MODALITY_OF_EXT[ext]
    meta: dict = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
        except ValueError as err:
            return _quarantine(source, modality, f"cannot parse json member: {key}.json: {_clean(err)}")
        meta = parsed if isinstance(parsed, dict) else {"json": parsed}
    split, err = _split(meta.pop("split", None), f"{key}.json")
    if err:
        return _quarantine(source, modality, err)
    label = _text(meta.pop(cfg.label_col, None))
    if label is None and "cls" in members:
        label = _text(members["cls"].decode("utf-8", "replace").strip())
    text = _text(members["txt"].decode("utf-8", "replace").strip()) if "txt" in members else None
    identity = f"shards:{shard.parent.name}/{shard.name}#{key}"
    return _Job(make_key(modality, identity), modality, source, data=members[ext], label=label, text=text,
                split=split, meta=meta)


def _plan_shards(sources: Sources, cfg: IngestConfig, quarantine: list) -> Iterator[_Job]:
    for shard in _expand_shards(sources.shards):
        samples = read_shard(shard)
        n = 0
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                break
            except _ShardError as err:
                reason = f"{err.reason}; kept the {n} samples read before it"
                quarantine.append(_quarantine(str(shard), "shard", reason))
                if err.partial is not None:
                    reason = "sample cut off by the shard error"
                    quarantine.append(_quarantine(f"{shard}#{err.partial}", "shard", reason))
                break
            n += 1
            job = _shard_job(shard, key, members, cfg)
            if isinstance(job, dict):
                quarantine.append(job)
            else:
                yield job


def _plan(sources: Sources, cfg: IngestConfig, quarantine: list) -> Iterator[_Job]:
    """Every input once, in a deterministic order; duplicates of an earlier key are quarantined here."""
    seen: dict[str, str] = {}
    jobs = itertools.chain(
        *(_plan_kind(kind, sources, cfg, quarantine) for kind in KINDS), _plan_shards(sources, cfg, quarantine)
    )
    for job in jobs:
        if job.key in seen:
            reason = f"duplicate of an earlier item: same key {job.key} as {seen[job.key]}"
            quarantine.append(_quarantine(job.source, job.modality, reason))
            continue
        seen[job.key] = job.source
        yield job


# ---------------------------------------------------------------------------------------------------------------
# Decoding in a small thread pool, results in submission order.


def _run(job: _Job, cfg: IngestConfig) -> Decoded | dict:
    try:
        data = job.data if job.data is not None else job.path.read_bytes()
    except OSError as err:
        return _quarantine(job.source, job.modality, f"cannot read file: {err.strerror or _clean(err)}")
    try:
        return decode_image(data) if job.modality == "image" else decode_audio(data, cfg)
    except DecodeError as err:
        return _quarantine(job.source, job.modality, str(err))


def _decode_in_order(jobs: Iterable[_Job], cfg: IngestConfig) -> Iterator[tuple[_Job, Decoded | dict]]:
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ingest")
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append((job, pool.submit(_run, job, cfg)))
            if len(pending) >= IN_FLIGHT:
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
    )


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
        quarantine: list[dict] = []
        rows: list[dict] = []
        spool_path = tmp / ".payloads.spool"  # payloads wait here (not in memory) until rows are sorted by key
        with open(spool_path, "w+b") as spool:
            results = _decode_in_order(_plan(sources, cfg, quarantine), cfg)
            for job, res in progress(results, desc="ingest", unit="file"):
                if isinstance(res, dict):
                    quarantine.append(res)
                    continue
                offset = spool.tell()
                spool.write(res.payload)
                meta = {**{k: _jsonable(v) for k, v in job.meta.items()}, **res.meta}
                rows.append(dict(
                    key=job.key, modality=job.modality, label=job.label, text=job.text, source=job.source,
                    payload_ext=res.ext, sha256=sha256_bytes(res.payload), nbytes=len(res.payload), width=res.width,
                    height=res.height, duration_s=res.duration_s, split=job.split,
                    meta=json.dumps(meta, sort_keys=True, default=str), offset=offset,
                ))
            n_inputs = len(rows) + sum(not q["reason"].startswith(SHARD_ERROR) for q in quarantine)
            if not rows:
                failed = out_dir.parent / f"{out_dir.name}.quarantine.parquet"
                _write_quarantine(failed, quarantine)
                common = Counter(q["reason"] for q in quarantine).most_common(1)
                why = f" (most common: {common[0][0]!r} x{common[0][1]})" if common else ""
                raise IngestError(f"no valid items: 0 of {n_inputs} files decoded{why}; see quarantine at {failed}")
            rows.sort(key=lambda r: r["key"])
            row_digest = _write_items(tmp / "items.parquet", rows, spool)
        spool_path.unlink()
        _write_quarantine(tmp / "quarantine.parquet", quarantine)
        n_items = {k.modality: sum(r["modality"] == k.modality for r in rows) for k in KINDS}
        write_json(tmp / "summary.json", {
            "n_items": n_items, "n_inputs": n_inputs, "n_quarantined": len(quarantine),
            "reasons": _reasons(quarantine), "digest": row_digest, "config": asdict(cfg),
        })
        record.update(
            items="items.parquet", quarantine="quarantine.parquet", summary="summary.json",
            n_items=n_items, n_quarantined=len(quarantine), digest=row_digest,
        )
    return _result(out_dir, record)


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
            for f in _folder_files(root, kind.exts):
                add(kind.folder, f.relative_to(root).as_posix(), f.resolve())
        if table is not None:
            add(kind.table, table.name, table.resolve())
            path_col = getattr(cfg, kind.path_col)
            for row in read_table(table, kind, cfg):
                value = _text(row.get(path_col))
                if value is not None:
                    p = Path(os.path.expanduser(value.strip()))
                    file = (p if p.is_absolute() else table.parent / p).resolve()
                    add(f"{kind.table}-file", value, file if file.is_file() else None)
    for shard in _expand_shards(sources.shards):
        add("shards", f"{shard.parent.name}/{shard.name}", shard)
    return h.hexdigest()
