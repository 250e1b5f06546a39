"""Where data and outputs live: a local path or an fsspec URL (s3://, gs://, memory://, file://, ...).

A *location* is a `Path` or a `str` URL. `location(x)` normalises what a user or a record passes: a plain path and
a `file://` URL become a `Path` (the local code path, unchanged); any other `scheme://...` stays a URL string and is
read and written through fsspec (s3:// needs the `s3fs` package, gs:// `gcsfs`; memory:// is built in and serves
the tests). `pathlib.Path("s3://b/k")` would silently turn the URL into the relative path `s3:/b/k`, so code that
takes a location calls `location()` instead of `Path()`.

What stays atomic:
- local folders (and file:// URLs): a file is written to a temporary sibling and renamed over the target; an output
  folder is filled in a temporary sibling and renamed (tasks/infra/common.py `atomic_dir`). One rename: all or nothing.
- object stores: one object is one PUT (`write_bytes`), and S3 and GCS make an object visible whole or not at all
  (a multipart upload too, at its completion), so a checkpoint or a JSON record is never seen half-written. A
  folder cannot be renamed there (a "move" is a copy of every object), so `upload_dir` uploads the files of a
  folder staged locally and writes `_SUCCESS` last: that marker is the commit point. Every reader of a stage output
  asks for it (`read_success`; the shard listings refuse a remote folder without it), so an interrupted upload
  leaves nothing that looks finished. Not excluded: two writers of one remote folder at the same time (the folders
  are content-addressed, so both write the same bytes), and a reader that lists files while a re-run replaces a
  finished folder.
"""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

Location = Path | str
LOCAL_SCHEMES = ("file", "local")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CHUNK = 1 << 20
_LOCAL = LocalFileSystem()


def is_url(x: object) -> bool:
    """True for a `scheme://...` string (a Path never is one)."""
    return isinstance(x, str) and _SCHEME.match(x) is not None


def location(x: str | os.PathLike) -> Location:
    """A plain path or file:// URL -> Path; any other URL -> the URL string (without a trailing '/')."""
    if not is_url(x):
        return Path(x)
    m = _SCHEME.match(x)
    if m.group(1).lower() in LOCAL_SCHEMES:
        return Path(LocalFileSystem._strip_protocol(x))
    return x[: m.end()] + x[m.end():].rstrip("/")


def is_remote(x: str | os.PathLike) -> bool:
    return isinstance(location(x), str)


def filesystem(x: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) of any location: the one place a path and a URL part ways.

    A local path or file:// URL -> fsspec's local filesystem and the absolute path; any other URL -> its
    filesystem, with a one-line error when its package is missing or the scheme is unknown."""
    loc = location(x)
    if isinstance(loc, Path):
        return _LOCAL, _LOCAL._strip_protocol(str(loc))
    try:
        return fsspec.core.url_to_fs(loc)
    except ImportError as exc:
        raise ValueError(f"cannot open {loc}: {exc} (pip install s3fs for s3://, gcsfs for gs://), "
                         "or use a local path") from None
    except ValueError as exc:
        raise ValueError(f"cannot open {loc}: {exc}; use an fsspec URL (s3://, gs://, file://, memory://) "
                         "or a local path") from None


def check(x: str | os.PathLike) -> Location:
    """`location(x)`, and for a URL make sure fsspec can open its filesystem (raises the one-line error if not)."""
    filesystem(x)
    return location(x)


def join(base: str | os.PathLike, *parts: str) -> Location:
    """base / part / ...: a Path for a local base, a URL string for a remote one."""
    loc = location(base)
    if isinstance(loc, Path):
        return loc.joinpath(*parts)
    return "/".join([loc.rstrip("/"), *(str(p).strip("/") for p in parts)])


def name(loc: Location) -> str:
    """The last component: file or folder name."""
    return loc.name if isinstance(loc, Path) else loc.rstrip("/").rsplit("/", 1)[-1]


def parent(loc: str | os.PathLike) -> Location:
    """The folder holding `loc`."""
    loc = location(loc)
    return loc.parent if isinstance(loc, Path) else loc.rsplit("/", 1)[0]


def exists(loc: str | os.PathLike) -> bool:
    fs, path = filesystem(loc)
    return fs.exists(path)


def isfile(loc: str | os.PathLike) -> bool:
    fs, path = filesystem(loc)
    return fs.isfile(path)


def open(loc: str | os.PathLike, mode: str = "rb") -> IO:  # noqa: A001 - the storage face of builtins.open
    """A file object for reading ("rb") or writing ("wb"); writes are not atomic: use write_bytes."""
    fs, path = filesystem(loc)
    return fs.open(path, mode)


def read_bytes(loc: str | os.PathLike) -> bytes:
    fs, path = filesystem(loc)
    return fs.cat_file(path)


def read_text(loc: str | os.PathLike) -> str:
    return read_bytes(loc).decode()


def write_bytes(loc: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write a whole file atomically: locally a temporary sibling renamed over it (fsync'ed first if asked);
    remotely one PUT of the final object."""
    loc = location(loc)
    if isinstance(loc, str):
        fs, path = filesystem(loc)
        fs.pipe_file(path, data)
        return
    tmp = loc.with_name(f".{loc.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, loc)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(loc: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(loc, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def files(loc: str | os.PathLike) -> list[str]:
    """Relative posix paths of every file under a folder, sorted by path components (as `sorted(Path.rglob)`)."""
    fs, root = filesystem(loc)
    root = root.rstrip("/")
    rel = [p[len(root):].lstrip("/") for p in fs.find(root)]
    return sorted(rel, key=lambda r: tuple(r.split("/")))


def glob(loc: str | os.PathLike, pattern: str) -> list[str]:
    """Files and folders under the folder `loc` matching a glob `pattern` (no '**'), as sorted paths (`str(Path)` for
    a local folder: a relative one stays relative) or URLs; [] when the folder is absent. The pattern is matched
    component by component, so glob characters in `loc` itself are taken literally, as `Path.glob` takes them."""
    parts = pattern.split("/")
    if "**" in parts:
        raise ValueError(f"glob pattern {pattern!r}: '**' is not supported")
    fs, root = filesystem(loc)
    root = root.rstrip("/")
    found = (p.rstrip("/")[len(root):].lstrip("/") for p in fs.find(root, maxdepth=len(parts), withdirs=True))
    return sorted(str(join(loc, rel)) for rel in found if rel and len(rel.split("/")) == len(parts)
                  and all(fnmatch.fnmatchcase(n, pat) for n, pat in zip(rel.split("/"), parts)))


def rmtree(loc: str | os.PathLike) -> None:
    """Remove a remote folder (every object under the prefix); nothing when absent."""
    loc = location(loc)
    if isinstance(loc, Path):
        raise TypeError(f"rmtree is for remote folders; {loc} is local")
    fs, path = filesystem(loc)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(local: Path, url: str, last: str) -> None:
    """Upload every file under `local` to the folder `url`, the file named `last` (the `_SUCCESS` marker) after all
    the others; whatever the folder held before is removed first (an unfinished leftover, or a folder re-made)."""
    fs, root = filesystem(url)
    rmtree(url)
    rel = files(local)
    for r in sorted(rel, key=lambda r: r == last):  # stable: `last` moves to the end
        fs.put_file(str(local / r), f"{root.rstrip('/')}/{r}")


def gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO:
    """webdataset's opener signature (webdataset.gopen.gopen_schemes) over fsspec, for the remote schemes."""
    fs, path = filesystem(url)
    return fs.open(path, mode)

