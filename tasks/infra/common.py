"""Small helpers every task shares: digests, atomic output directories, progress bars.

A task writes its output under a directory named by a digest of (input digests, config, code version), into a
temporary sibling first and renamed when complete, with a `_SUCCESS` record inside. A directory without `_SUCCESS`
is never treated as finished, so an interrupted run leaves nothing that looks done, and a finished one is never
deleted (a reader may be using it). One writer per output: a stage holds `output_lock` (a file lock beside the
folder) while it reuses or builds it, so a second process waits and then reuses the result; the temporary folders
of killed writers are removed when the lock is taken. Locations may be fsspec URLs (s3://, gs://, memory://): there
the folder is staged locally, uploaded, and `_SUCCESS` written last (storage.py says what stays atomic where); a
remote folder has no lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from tasks.infra import storage

SUCCESS = "_SUCCESS"
T = TypeVar("T")


def to_jsonable(obj: Any) -> Any:
    """Configs (dataclasses, pydantic models), paths and containers as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump"):  # pydantic
        return to_jsonable(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def plain(obj: Any) -> Any:
    """JSON values only (str, int, float, bool, None, dict with str keys, list): a record as JSON stores it and reads
    it back, so a task returns the same record computed or cached. Paths become strings, tuples lists, numpy scalars
    and arrays numbers and lists; anything else raises TypeError."""
    return json.loads(json.dumps(to_jsonable(obj), default=_json_number))


def _json_number(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not a JSON value: {obj!r}")


def digest(*parts: Any, n: int = 16) -> str:
    """A stable hex digest of JSON-able parts (configs, digests, strings)."""
    blob = json.dumps([to_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a local path or an fsspec URL)."""
    return storage.sha256(path)


def tree_digest(path: str | Path) -> str:
    """sha256 over (relative path, content sha256) of every file under a folder (local or URL), in sorted order."""
    h = hashlib.sha256()
    for rel in storage.files(path):
        h.update(rel.encode() + b"\0" + file_sha256(storage.join(path, rel)).encode())
    return h.hexdigest()


def code_version(*objs: Any) -> str:
    """Digest of the source of modules, packages (every .py file in them) or functions: part of every output key,
    so changed code re-runs what it computes."""
    sources = []
    for o in objs:
        if hasattr(o, "__path__"):  # a package: all of its modules
            sources += [p.read_text() for d in o.__path__ for p in sorted(Path(d).rglob("*.py"))]
        else:
            sources.append(inspect.getsource(o))
    return digest(*sources, n=12)


def read_success(path: str | Path) -> dict | None:
    """The record a finished output directory (local or URL) holds, or None when it is absent or unfinished."""
    marker = storage.join(path, SUCCESS)
    if not storage.isfile(marker):
        return None
    return json.loads(storage.read_text(marker))


def require_finished(path: str | Path) -> None:
    """Raise for a remote folder without `_SUCCESS`: on an object store its files appear one by one and the marker
    comes last, so a reader must not list it before. (A local folder appears whole, by rename.)"""
    if storage.is_remote(path) and read_success(path) is None:
        raise FileNotFoundError(f"{storage.location(path)} has no {SUCCESS}: it is unfinished (still being uploaded, "
                                "or its writer died); wait for it or re-run the stage that writes it")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: locally a temp file in the same folder, then rename; at a URL one PUT."""
    storage.write_bytes(path, (json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(final: str | Path, record: dict | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success write `_SUCCESS` and rename it to `final`.

    On an exception the temp directory is removed and `final` is untouched. The caller fills `record` (a dict it
    passed in) with what `_SUCCESS` should hold: counts, digests, relative paths.
    A finished `final` (one with `_SUCCESS`) is never deleted or replaced, since a reader may be using it: when
    another writer finished it first, this one's folder is dropped and `record` becomes the finished one's. An
    unfinished leftover (no `_SUCCESS`: its writer died) is replaced. Stages hold `output_lock` around "reuse or
    build", so only one writer builds an output and it is reused by the others.
    A remote `final` (an fsspec URL): the temp directory is a local one, uploaded on success with `_SUCCESS` last.
    """
    final = storage.location(final)
    if isinstance(final, str):
        with _remote_dir(final, record) as tmp:
            yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final)
    tmp.mkdir()
    try:
        yield tmp
        write_json(tmp / SUCCESS, record if record is not None else {})
        _publish(tmp, final, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_beside(final: Path) -> Path:
    """`.<name>.tmp-<pid>-<random>` beside `final`: the pid says whose it is (`clean_stale_temps`)."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, final: Path, record: dict | None) -> None:
    """Rename the finished `tmp` to `final`. rename() only replaces an empty folder, so a finished `final` is never
    touched: ours is dropped instead. An unfinished leftover is first renamed aside (one atomic step), then removed."""
    while True:
        try:
            os.rename(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        done = read_success(final)
        if done is not None:  # another writer finished it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if record is not None:
                record.clear()
                record.update(done)
            return
        aside = _temp_beside(final)
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- one writer
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _lock_file(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def output_lock(final: str | Path) -> Iterator[None]:
    """Hold the lock of one output folder: one writer per output. A stage holds it around "reuse `final` if it has
    `_SUCCESS`, else build it", so a second process (or thread) writing the same output waits here, then finds the
    finished folder and reuses it. Once the lock is held, temporary folders that killed writers left beside `final`
    are removed (`clean_stale_temps`).

    The lock is an `fcntl.flock` on `<parent>/.<name>.lock` (kept, never deleted: removing a lock file someone waits
    on would let two writers in). flock locks are per open file, not per process: taking the lock of one output
    twice in one thread waits forever. It serialises writers on one machine, and on a shared filesystem that
    supports flock across machines (NFSv4, Lustre with flock enabled).
    A remote `final` (an fsspec URL) has no local lock: nothing is locked or cleaned, and two writers of one remote
    folder may both build it (the folders are content-addressed, so they write the same bytes; storage.py).
    """
    final = storage.location(final)
    if isinstance(final, str):
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(final), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process writing {final}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            clean_stale_temps(final.parent, holding=final.name)
            yield
        finally:  # explicit: a child forked meanwhile (data-loader workers) shares this open file, not the lock
            fcntl.flock(f, fcntl.LOCK_UN)


def clean_stale_temps(folder: Path, holding: str | None = None) -> list[Path]:
    """Remove the temporary folders (`.<name>.tmp-<pid>-<random>`) that killed writers left in `folder`; return them.

    One is stale when its process is gone (`os.kill(pid, 0)` finds no such process) and no one holds the lock of its
    output (`holding`: the output whose lock the caller holds). A live process's folder is never touched, nor one
    whose output's lock is held (a writer on another machine of a shared filesystem, whose pid means nothing here)."""
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP.match(p.name)
        if m is None or not p.is_dir() or _alive(int(m["pid"])):
            continue
        with _lock_free(folder / m["name"], held=m["name"] == holding) as free:
            if free:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if removed:
        _say(f"removed {len(removed)} temporary folder(s) that killed writers left in {folder}")
    return removed


def _say(message: str) -> None:
    print(f"tessera: {message}", file=sys.stderr, flush=True)  # one line on stderr, in the task's log under Prefect


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def _lock_free(final: Path, held: bool) -> Iterator[bool]:
    """True (holding it meanwhile) when the lock of output `final` is free or already ours."""
    if held:
        yield True
        return
    with open(_lock_file(final), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _remote_dir(final: str, record: dict | None) -> Iterator[Path]:
    storage.check(final)  # a missing fsspec package fails before the work, not after it
    tmp = Path(tempfile.mkdtemp(prefix=f"tessera-{storage.name(final)}-"))
    try:
        yield tmp
        write_json(tmp / SUCCESS, record if record is not None else {})
        storage.upload_dir(tmp, final, last=SUCCESS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """tqdm when attached to a terminal; a plain iterator otherwise (Prefect logs carry progress there)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)
