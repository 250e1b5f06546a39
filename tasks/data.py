"""Prefect tasks of the data plane: built-in dataset -> ingest -> shards -> preprocess.

Each task names its output directory by a digest of its inputs' content digests, its config and its code, so a
re-run with the same inputs finds the finished directory (and Prefect's cache, keyed the same way, marks the task
run Cached). Retries only where a failure can be transient (file I/O); bad items are quarantined, not retried.
The shard and preprocess outputs may go to a remote store: their `root` may be an fsspec URL (tasks/storage.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks import ingest as ingest_lib
from tasks import storage
from tasks import preprocess as prep_lib
from tasks import shards as shard_lib
from tasks import features, speech, synthetic
from tasks.cache import content, path_digest
from tasks.common import code_version, digest, read_success
from tasks.ingest import IngestConfig, Sources
from tasks.preprocess import PrepConfig
from tasks.shards import ShardConfig
from tasks.synthetic import SyntheticConfig

def stage(*code) -> dict:
    """Task options of a stage whose work is done by `code` (its cache key covers that code)."""
    return dict(cache_policy=content(*code), persist_result=True)


def transient_only(task, task_run, state) -> bool:
    """Retry I/O failures (a flaky disk or network store); bad input (a ValueError) fails at once with its message."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


IO_RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)


def _record(out: Path | str, record: dict) -> dict:
    return {"path": str(out), **record}


@task(name="builtin-dataset", **IO_RETRY, **stage(synthetic, speech))
def builtin_dataset(cfg: SyntheticConfig, root: Path) -> dict:
    """Generate the built-in synthetic dataset (images, captions, speech) in the layout users bring."""
    out = Path(root) / "builtin" / digest(cfg, code_version(synthetic, speech))
    summary = synthetic.generate(cfg, out)
    return _record(out, {"counts": {k: v for k, v in summary.items() if isinstance(v, int)}})


def builtin_sources(dataset_dir: str | Path) -> Sources:
    d = Path(dataset_dir)
    return Sources(images=d / "images", audio=d / "audio", captions=d / "captions.csv", transcripts=d / "transcripts.csv")


@task(name="ingest", **IO_RETRY, **stage(ingest_lib))
def ingest(sources: Sources, cfg: IngestConfig, root: Path) -> dict:
    """Decode and validate every input once; quarantine what fails; write items.parquet."""
    out = Path(root) / "ingest" / digest(ingest_lib.digest_sources(sources, cfg), cfg, code_version(ingest_lib))
    res = ingest_lib.ingest(sources, cfg, out)
    return _record(
        out,
        {
            "items": str(res.items_path),
            "quarantine": str(res.quarantine_path),
            "n_items": dict(res.n_items),
            "n_quarantined": res.n_quarantined,
            "digest": res.digest,
        },
    )


@task(name="shard", **IO_RETRY, **stage(shard_lib))
def shard(items: Path | str, cfg: ShardConfig, root: Path | str) -> dict:
    """Write webdataset shards and the Parquet manifest (under `root`: a folder or an fsspec URL)."""
    items = storage.location(items)
    out = storage.join(root, "shards", digest(path_digest(items), cfg, code_version(shard_lib)))
    record = read_success(out) or shard_lib.write_shards(items, cfg, out)
    return _record(out, record)


@task(name="preprocess", **IO_RETRY, **stage(prep_lib, features))
def preprocess(shards: Path | str, cfg: PrepConfig, root: Path | str) -> dict:
    """Model-ready spectrogram/image shards, normalisation stats and the patch sample set (under `root`)."""
    shards = storage.location(shards)
    out = storage.join(root, "prep", digest(path_digest(shards), cfg, code_version(prep_lib, features)))
    record = read_success(out) or prep_lib.preprocess(shards, cfg, out)
    return _record(out, record)
