"""The project's one Prefect cache policy: content digests + config + task source.

Prefect's `INPUTS` policy hashes a `Path` as its string, and its default policy includes the run id (no reuse
across runs). Here a `Path` input is keyed by its content: a finished task output by the digest in its `_SUCCESS`
record, any other file or folder by the sha256 of its bytes. Configs are keyed by their fields. An input named
`root` (the output root) is keyed by an epoch file inside it, so deleting the whole output root invalidates every
cached record that pointed into it. `parent_run_id` (where a task reports in MLflow) is not part of the key.
A location given as an fsspec URL string (s3://, gs://, memory://, file://; storage.py) is keyed like a
`Path`: by its content, never by the URL text, and a `root` URL by the epoch object under it.

A stage also names the output folder its inputs go to (`output`). The key then includes that folder's epoch, a
random id beside it that is renewed whenever the folder is not finished (no `_SUCCESS`): a stored record whose
output was deleted, or never finished, is not a hit, the task runs again, and the record it stores is under the key
later runs compute while the folder is there. (Prefect finds a cached record by key only; it cannot be told to
ignore one, so the key has to change.)
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import TASK_SOURCE, CachePolicy

from tasks.infra import storage
from tasks.infra.common import code_version, digest, file_sha256, read_success, to_jsonable, tree_digest

EPOCH = ".epoch"
# inputs that say where to report, not what to compute: never part of a cache key
NOT_KEYED = frozenset({"parent_run_id", "experiment"})


def root_epoch(root: Path | str) -> str:
    """A random id stored in the output root (a folder or a URL); a new root (or a wiped one) gets a new id."""
    root = storage.location(root)
    if isinstance(root, Path):
        root.mkdir(parents=True, exist_ok=True)
    marker = storage.join(root, EPOCH)
    if not storage.exists(marker):
        storage.write_bytes(marker, uuid.uuid4().hex.encode())
    return storage.read_text(marker).strip()


def output_epoch(out: Path | str) -> str:
    """A random id kept beside an output folder (`.<name>.epoch`, local or at a URL), renewed whenever the folder has
    no `_SUCCESS` (missing, deleted, or left unfinished): the same id while the folder stays finished, a new one on
    every look while it is not."""
    out = storage.location(out)
    marker = storage.join(storage.parent(out), f".{storage.name(out)}.epoch")
    if read_success(out) is None or not storage.exists(marker):
        if isinstance(out, Path):
            out.parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(marker, uuid.uuid4().hex.encode())
    return storage.read_text(marker).strip()


def path_digest(path: Path | str) -> str:
    """Content digest of a file or folder, local or at a URL (a finished task output answers with its recorded
    digest)."""
    path = storage.location(path)
    if not storage.exists(path):
        return f"missing:{path}"
    if storage.isfile(path):
        return file_sha256(path)
    record = read_success(path)
    if record is not None and "digest" in record:
        return record["digest"]
    return tree_digest(path)


def _key_of(value: Any) -> Any:
    if not isinstance(value, type) and callable(getattr(value, "cache_key", None)):
        return value.cache_key()  # an input that names its own content (ingest's Sources: never opens special files)
    if isinstance(value, Path) or storage.is_url(value):
        return path_digest(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _key_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _key_of(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_of(v) for v in value]
    return to_jsonable(value)


@dataclass
class ContentDigest(CachePolicy):
    """Cache key = task source + the code it runs (`code`: modules/packages) + content digests of Path inputs +
    config fields + the epoch of the output folder (`output`: the task's inputs by name -> that folder)."""

    code: tuple = ()
    output: Callable[..., Path | str] | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        if not task_ctx:
            return None
        parts = {}
        if self.output is not None:
            try:
                out = self.output(**(inputs or {}))
            except Exception:  # bad inputs: no key (no cache); the task runs and reports the error itself
                return None
            parts["<output>"] = output_epoch(out)
        for name, value in sorted((inputs or {}).items()):
            if name in NOT_KEYED:
                continue
            if name == "root" and (isinstance(value, Path) or storage.is_url(value)):
                parts[name] = root_epoch(value)
            else:
                parts[name] = _key_of(value)
        source = TASK_SOURCE.compute_key(task_ctx, inputs, flow_parameters)
        return digest(task_ctx.task.name, source, code_version(*self.code) if self.code else "", parts, n=32)


def content(*code, output: Callable[..., Path | str] | None = None) -> ContentDigest:
    """The project's cache policy for a task whose work is done by the given modules/packages and whose output
    folder `output(**inputs)` names."""
    return ContentDigest(code=tuple(code), output=output)
