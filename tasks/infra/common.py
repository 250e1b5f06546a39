"""Small helpers every task shares: digests, atomic output directories, progress bars.

A task writes its output under a directory named by a digest of (input digests, config, code version), into a
temporary sibling first and renamed when complete, with a `_SUCCESS` record inside. A directory without `_SUCCESS`
is never treated as finished, so an interrupted run leaves nothing that looks done. Locations may be fsspec URLs
(s3://, gs://, memory://): there the folder is staged locally, uploaded, and `_SUCCESS` written last
(storage.py says what stays atomic where).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
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
    A remote `final` (an fsspec URL): the temp directory is a local one, uploaded on success with `_SUCCESS` last.
    """
    final = storage.location(final)
    if isinstance(final, str):
        with _remote_dir(final, record) as tmp:
            yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_json(tmp / SUCCESS, record if record is not None else {})
        if final.exists():  # an unfinished leftover (no _SUCCESS) from an earlier crash: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
