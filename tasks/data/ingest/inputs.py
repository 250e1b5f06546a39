"""What ingest may read, and how it reads it: the rules for bad input, in one place.

- Only regular files are read. A path is checked with stat before anything opens it (a FIFO, device, socket or
  folder is refused with its reason and never opened, not even to sniff it), and the file is opened with O_NONBLOCK
  and checked again on the open descriptor (fstat), so a file swapped for a FIFO in between cannot hang the run.
- The allowed roots are the folders and the folders of the tables the user named, plus every `--allow-root DIR`.
  A path (a table row, a symlink in a folder) whose resolved location is outside them is refused before it is
  opened. Shards are named by the user and are read wherever they are.
- URLs (fsspec URLs and webdataset's `pipe:COMMAND`) are read only as shards named on the command line or in the
  config; a table cell holding one is refused (tables name local files).
- A folder search follows symlinks inside the roots, never loops (a link back to a folder being searched is refused
  as a symlink loop), skips hidden names (a hidden file with a supported extension is refused, a hidden folder is
  not searched and counted) and counts every file it passes over.

The `Ledger` collects what planning refuses (quarantine entries with a reason) and passes over (counts by reason).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tasks.infra import storage

STAGE = "ingest"
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|pipe:)")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_CHUNK = 1 << 20


class IngestError(ValueError):
    """A problem with what was passed in (not with one item): one line naming the value and the fix."""


class Refused(Exception):
    """An input that is not read, with its one-line reason ("kind: details")."""


def quarantine_entry(source: str, modality: str, reason: str) -> dict:
    return {"source": source, "modality": modality, "reason": reason, "stage": STAGE}


@dataclass
class Ledger:
    """What planning and decoding refused (quarantine entries) and passed over (counts by reason)."""

    quarantine: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    retracted: set[str] = field(default_factory=set)  # job keys refused after they were planned (split tar samples)

    def refuse(self, source: str, modality: str, reason: str) -> None:
        self.quarantine.append(quarantine_entry(source, modality, reason))


def is_url(value: str) -> bool:
    """An fsspec URL (scheme://...) or a webdataset `pipe:` command."""
    return _URL.match(value) is not None


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def roots_of(paths: Iterable[str | os.PathLike | None]) -> tuple[Path, ...]:
    """The allowed roots: each path fully resolved (symlinks too), in order, once."""
    return tuple(dict.fromkeys(Path(os.path.realpath(p)) for p in paths if p is not None))


def inside(real: Path, roots: tuple[Path, ...]) -> bool:
    return any(real == r or real.is_relative_to(r) for r in roots)


def check_file(path: Path, roots: tuple[Path, ...], what: str) -> Path:
    """The resolved path of a regular file inside the roots, else Refused. `what` names the path in the reason
    ("caption row 3 points at ..."). Resolves and stats; never opens anything."""
    try:
        real = Path(os.path.realpath(path))
    except ValueError:  # an embedded NUL byte
        raise Refused(f"invalid path: {what} contains a NUL byte") from None
    if not inside(real, roots):
        raise Refused(f"outside the allowed roots: {what}, which resolves to {real}; "
                      "allow its folder with --allow-root DIR")
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Refused(f"symlink loop: {what} is a symlink that never resolves") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                raise Refused(f"broken symlink: {what} is a symlink to the missing {os.readlink(path)}") from None
            raise Refused(f"missing file: {what}") from None
        raise Refused(f"cannot access file: {what}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"not a regular file: {what} is {file_kind(st.st_mode)}; special files are never opened")
    return real


def open_regular(path: Path) -> int:
    """An O_RDONLY|O_NONBLOCK descriptor of `path` if it is (still) a regular file, else Refused; the caller
    closes it. O_NONBLOCK: opening a FIFO cannot block; fstat on the descriptor: what was opened is what is read."""
    fd = os.open(path, _OPEN_FLAGS)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused(f"not a regular file: {path} is {file_kind(st.st_mode)}; special files are never read")
    return fd


def read_regular(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes (at most max_bytes, else Refused)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise Refused(f"file too large: {path} is {size} bytes > {max_bytes} (raise --max-file-mb)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise Refused(f"file too large: {path} holds more than {max_bytes} bytes (raise --max-file-mb)")
    return data


def sha256_regular(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def stamp(path: Path) -> str:
    """size and modification time (ns) of what `path` points at, or why there is nothing: a cheap change detector
    that opens nothing."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as err:
        return f"unavailable:{type(err).__name__}"
    return f"{file_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'file'}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------------------------
# Folders


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _folder_entry(entry: os.DirEntry, chain: tuple[Path, ...], roots, visited: set, ledger: Ledger,
                  modality: str) -> tuple[Path, Path] | None:
    """(path, resolved path) of a sub-folder to search next, or None (and the reason in the ledger)."""
    path = Path(entry.path)
    if entry.name.startswith("."):
        ledger.skipped["hidden folder (not searched)"] += 1
        return None
    real = Path(os.path.realpath(path))
    if not inside(real, roots):
        ledger.refuse(str(path), modality, f"outside the allowed roots: folder {path} resolves to {real}; allow it "
                      "with --allow-root DIR")
    elif real in chain:
        ledger.refuse(str(path), modality, f"symlink loop: folder {path} leads back to {real}, which is being searched")
    elif real in visited:
        ledger.skipped["folder reached again through a symlink (searched once)"] += 1
    else:
        visited.add(real)
        return path, real
    return None


def _file_entry(entry: os.DirEntry, exts, roots, ledger: Ledger, modality: str) -> tuple[Path, Path] | None:
    """(path, resolved path) of a candidate file, or None (and the reason in the ledger)."""
    path = Path(entry.path)
    dangling = entry.is_symlink() and not os.path.exists(path)  # broken or looping: refused whatever its name
    if _ext(entry.name) not in exts and not dangling:
        ledger.skipped[f"not an {modality} file (extension)"] += 1
        return None
    if entry.name.startswith(".") and not dangling:
        ledger.refuse(str(path), modality, f"hidden file: {path} is not read (names starting with '.' are skipped)")
        return None
    try:
        return path, check_file(path, roots, str(path))
    except Refused as why:
        ledger.refuse(str(path), modality, str(why))
        return None


def scan_folder(root: Path, exts: tuple[str, ...], roots: tuple[Path, ...], ledger: Ledger,
                modality: str) -> list[tuple[Path, Path]]:
    """(path, resolved path) of every readable candidate under root, sorted by relative path. Symlinks are followed
    inside the roots; what is refused or passed over goes to the ledger. Only lists folders and stats entries."""
    found: list[tuple[Path, Path]] = []
    real_root = Path(os.path.realpath(root))
    stack, visited = [(root, (real_root,))], {real_root}
    while stack:
        folder, chain = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            ledger.refuse(str(folder), modality, f"cannot list folder: {folder}: {err.strerror}")
            continue
        for entry in reversed(entries):
            try:
                is_dir = entry.is_dir()  # follows symlinks; stat only
            except OSError:
                is_dir = False
            if is_dir:
                if (sub := _folder_entry(entry, chain, roots, visited, ledger, modality)) is not None:
                    stack.append((sub[0], (*chain, sub[1])))
            elif (hit := _file_entry(entry, exts, roots, ledger, modality)) is not None:
                found.append(hit)
    return sorted(found, key=lambda pr: pr[0].relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------------------------
# Shard locations: paths, globs, brace patterns, fsspec URLs, pipe: commands


def _local_matches(pattern: str) -> list[str]:
    if any(c in pattern for c in "*?["):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise IngestError(f"shard pattern {pattern} matches no files; pass --shards with existing .tar files or "
                             "globs")
        return matches
    if not os.path.lexists(pattern):
        raise IngestError(f"shard {pattern} does not exist; pass --shards with existing .tar files or globs")
    return [pattern]


def _url_matches(pattern: str) -> list[str]:
    fs, path = storage.filesystem(pattern)
    if any(c in path for c in "*?["):
        matches = [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
        if not matches:
            raise IngestError(f"shard pattern {pattern} matches nothing; pass --shards with existing shards")
        return matches
    if not fs.exists(path):
        raise IngestError(f"shard {pattern} does not exist; pass --shards with existing shards")
    return [pattern]


def expand_shards(specs: Iterable[str]) -> list[tuple[Path | str, str | None]]:
    """(location, reason it is refused or None) of every shard, in the order given (each glob sorted), once.
    A location is a resolved local Path, an fsspec URL or a `pipe:` command. IngestError for a pattern that matches
    nothing or a URL whose filesystem cannot be opened."""
    from braceexpand import braceexpand  # a webdataset dependency

    out: dict[Path | str, str | None] = {}
    for spec in specs:
        for pattern in braceexpand(spec if is_url(spec) else os.path.expanduser(spec)):
            if pattern.startswith("pipe:"):
                out.setdefault(pattern, None)
            elif storage.is_remote(pattern):
                try:
                    urls = _url_matches(pattern)
                except IngestError:
                    raise
                except ValueError as err:  # storage's one-line error for a scheme fsspec cannot open
                    raise IngestError(str(err)) from None
                for url in urls:
                    out.setdefault(url, None if storage.isfile(url) else f"not a regular file: {url} is not a file")
            else:
                for m in _local_matches(str(storage.location(pattern))):
                    st = os.stat(m) if os.path.exists(m) else None
                    why = None if st is not None and stat.S_ISREG(st.st_mode) else (
                        f"not a regular file: shard {m} is {file_kind(st.st_mode) if st else 'a broken symlink'}; "
                        "special files are never opened")
                    out.setdefault(Path(m).resolve() if why is None else Path(os.path.abspath(m)), why)
    return list(out.items())


def shard_stamp(loc: Path | str) -> str:
    """What a shard's cache key holds, without reading it (shards can be large): a local file's resolved path, size
    and modification time (ns); a URL's size and whatever version its store reports (ETag, mtime); a pipe: command's
    text (its output cannot be known without running it)."""
    if isinstance(loc, Path):
        return f"{loc}\0{stamp(loc)}"
    if loc.startswith("pipe:"):
        return loc
    fs, path = storage.filesystem(loc)
    info = fs.info(path)
    version = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated",
                                           "created", "md5Hash") if info.get(k) is not None), "")
    return f"{loc}\0{info.get('size')}\0{version}"
