"""Users' webdataset tar shards (img2dataset's layout: key.jpg|png|webp or an audio file, key.txt, key.json) as
ingest jobs. A shard is a local file, an fsspec URL or a `pipe:COMMAND` (inputs.expand_shards), read as a stream.

A corrupt or truncated shard keeps the samples read before the damage; the shard and the sample cut off are
quarantined with the reason. Keys come from "<shard folder>/<shard name>#<member key>".

Members are never extracted to disk and never followed. A sample is refused with its reason when a member's name is
absolute or climbs out with '..', when a member is a link or a special file, when a member is larger than
max_file_bytes (it is skipped, not read), or when one name appears twice. A sample whose members are not adjacent
(webdataset would read two samples) is refused whole: the part planned first is taken back (Ledger.retracted), so
an image never lands without the caption that is in the same tar. Members named other than key.ext (hidden names,
no extension) are counted as skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import IO, Iterator

from tasks.infra import storage
from tasks.data.ingest.decode import one_line
from tasks.data.ingest.inputs import Ledger, Refused, expand_shards, open_regular
from tasks.data.ingest.sources import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    MODALITY_OF_EXT,
    IngestConfig,
    Job,
    Sources,
    make_key,
    parse_split,
    quarantine_entry,
    text_cell,
)

SHARD_ERROR = "tar shard is"  # how a whole-shard quarantine reason starts (the shard, not one input)
PIPE_WAIT_S = 60  # after its output is read, how long a pipe: command may take to exit before it is killed

# webdataset's rule: key = member name up to the first dot after the last '/', extension = the rest
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_DRIVE = re.compile(r"^[A-Za-z]:")


class ShardError(Exception):
    def __init__(self, reason: str, partial: str | None):
        super().__init__(reason)
        self.reason, self.partial = reason, partial


class _EndAwareInfo(tarfile.TarInfo):
    """Marks the archive when its stream ends with the end-of-archive block (tarfile stops quietly at a cut, empty
    or damaged header too): anything else means the shard is truncated."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.tessera_clean_end = True
            raise


def unsafe_name(name: str) -> bool:
    """An absolute member name, a drive letter, or one with a '..' component ('/' or '\\' separated)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or _DRIVE.match(name) is not None or ".." in parts


@contextlib.contextmanager
def _open_shard(loc: Path | str) -> Iterator[IO[bytes]]:
    """A binary stream of a shard: a regular local file (opened without blocking, checked on the descriptor), a
    pipe: command's standard output (a non-zero exit is a shard error), or an fsspec URL."""
    if isinstance(loc, Path):
        with os.fdopen(open_regular(loc), "rb") as f:
            yield f
    elif loc.startswith("pipe:"):
        proc = subprocess.Popen(loc[5:], shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            try:
                rc = proc.wait(timeout=PIPE_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        if rc not in (0, -13, 141):  # SIGPIPE (signal 13, or 128 + 13 from a shell): the archive ended first
            raise OSError(f"pipe command exited with status {rc}")
    else:
        with storage.open(loc) as f:
            yield f


def _member_problem(info: tarfile.TarInfo, members: dict, ext: str, max_bytes: int) -> str | None:
    """Why a member refuses its sample, or None."""
    if unsafe_name(info.name):
        return f"unsafe tar member name: {info.name!r} is absolute or climbs out with '..'"
    if not info.isfile():
        kind = ("a symlink" if info.issym() else "a hard link" if info.islnk() else "a device" if info.isdev()
                else "a FIFO" if info.isfifo() else "not a regular file")
        return f"tar member is not a regular file: {info.name} is {kind}; links and special members are never followed"
    if info.size > max_bytes:
        return f"file too large: tar member {info.name} is {info.size} bytes > {max_bytes} (raise --max-file-mb)"
    if ext in members:
        return f"duplicate member: {info.name} appears twice in one sample"
    return None


def read_shard(loc: Path | str, max_bytes: int = 256 << 20,
               skipped=None) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {ext: bytes}, why the sample is refused or None) per run of adjacent members, in tar order, streaming.
    Raises ShardError at a corrupt or truncated point, after yielding every sample completed before it (`partial`
    names the sample that was being read). Members not named key.ext are counted in `skipped` (a Counter)."""
    current, members, problem = None, {}, None
    try:
        with _open_shard(loc) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareInfo) as tf:
            for info in tf:
                if info.isdir():
                    continue
                m = _MEMBER.match(info.name.removeprefix("./"))
                if m is None:
                    if skipped is not None:
                        skipped["tar member not named key.ext (hidden or without an extension)"] += 1
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if key != current:
                    if current is not None:
                        yield current, members, problem
                    current, members, problem = key, {}, None
                why = _member_problem(info, members, ext, max_bytes)
                if why is None:
                    members[ext] = tf.extractfile(info).read()
                problem = problem or why
            if not getattr(tf, "tessera_clean_end", False):
                raise ShardError("tar shard is truncated: it ends without the end-of-archive marker", current)
    except (tarfile.TarError, EOFError, OSError, ValueError, Refused) as err:
        raise ShardError(f"tar shard is corrupt or truncated: {one_line(err)}", current) from None
    if current is not None:
        yield current, members, problem


def _identity(loc: Path | str) -> str:
    if isinstance(loc, Path):
        return f"{loc.parent.name}/{loc.name}"
    if loc.startswith("pipe:"):
        return loc
    return f"{storage.name(storage.parent(loc))}/{storage.name(loc)}"


def _shard_job(shard: Path | str, key: str, members: dict[str, bytes], cfg: IngestConfig) -> Job | dict:
    """One sample's job, or its quarantine entry (no media member, unreadable json, bad split)."""
    source = f"{shard}#{key}"
    media = [e for e in (*IMAGE_EXTS, *AUDIO_EXTS) if e in members]
    if not media:
        found = ", ".join(sorted(members)) or "nothing"
        return quarantine_entry(source, "shard", f"no image or audio member: the sample has only {found}")
    ext = media[0]
    modality = MODALITY_OF_EXT[ext]
    meta: dict = {}
    if "json" in members:
        try:
            parsed = json.loads(members["json"])
        except ValueError as err:
            return quarantine_entry(source, modality, f"cannot parse json member: {key}.json: {one_line(err)}")
        meta = parsed if isinstance(parsed, dict) else {"json": parsed}
    split, err = parse_split(meta.pop("split", None), f"{key}.json")
    if err:
        return quarantine_entry(source, modality, err)
    label = text_cell(meta.pop(cfg.label_col, None))
    if label is None and "cls" in members:
        label = text_cell(members["cls"].decode("utf-8", "replace").strip())
    text = text_cell(members["txt"].decode("utf-8", "replace").strip()) if "txt" in members else None
    identity = f"shards:{_identity(shard)}#{key}"
    return Job(make_key(modality, identity), modality, source, data=members[ext], label=label, text=text,
                split=split, meta=meta)


_SPLIT = "split"  # planned[key] once the sample is refused as split


def _split(shard, key: str, planned: dict[str, str | None], ledger: Ledger) -> None:
    """A sample seen again after other members: refuse it whole (once) and take back the part planned first."""
    if planned.get(key) == _SPLIT:
        return
    if planned.get(key) is not None:
        ledger.retracted.add(planned[key])
    ledger.refuse(f"{shard}#{key}", "shard", f"split sample: the members of {key} are not adjacent in the shard "
                  "(webdataset would read two samples); the whole sample is refused")
    planned[key] = _SPLIT


def _plan_shard(shard: Path | str, cfg: IngestConfig, ledger: Ledger) -> Iterator[Job]:
    samples = read_shard(shard, cfg.max_file_bytes, ledger.skipped)
    planned: dict[str, str | None] = {}  # key -> its job key (None: refused or quarantined; _SPLIT: split)
    n = 0
    while True:
        try:
            key, members, problem = next(samples)
        except StopIteration:
            return
        except ShardError as err:
            ledger.refuse(str(shard), "shard", f"{err.reason}; kept the {n} samples read before it")
            if err.partial is not None:
                if err.partial in planned:
                    _split(shard, err.partial, planned, ledger)
                ledger.refuse(f"{shard}#{err.partial}", "shard", "sample cut off by the shard error")
            return
        n += 1
        if key in planned:
            _split(shard, key, planned, ledger)
            continue
        job = quarantine_entry(f"{shard}#{key}", "shard", f"{problem}; the sample is refused") if problem else \
            _shard_job(shard, key, members, cfg)
        planned[key] = None if isinstance(job, dict) else job.key
        if isinstance(job, dict):
            ledger.quarantine.append(job)
        else:
            yield job


def plan_shards(sources: Sources, cfg: IngestConfig, ledger: Ledger) -> Iterator[Job]:
    for shard, why in expand_shards(sources.shards):
        if why is not None:
            ledger.refuse(str(shard), "shard", why)
        else:
            yield from _plan_shard(shard, cfg, ledger)
