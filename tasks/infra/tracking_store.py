"""The MLflow tracking store: which one (one tracking URI for the whole process), how to reach it (a client, a
SQLite store that appears whole), where artifacts go, and experiments by name. Runs: tasks/infra/tracking.py.

Tracking URI: `MLFLOW_TRACKING_URI` when set; otherwise MLflow 3's own default, a SQLite file `mlflow.db` in the
working directory, written out as an absolute `sqlite:///<cwd>/mlflow.db` so that every client of this process
agrees on it (MLflow itself silently switches to `./mlruns` when such a folder holds old file-store data).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or sqlite:///<cwd>/mlflow.db (MLflow 3's default store, made explicit)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def client() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri[len("sqlite:///") :]))
    return MlflowClient(tracking_uri=uri)


def _create_sqlite_store(path: Path) -> None:
    """A SQLite store that does not exist yet is built in a temporary file and linked into place whole: MLflow
    creates its tables in place, over seconds, and a process killed meanwhile left a store no later start could
    open ("table _alembic_tmp_trace_tags already exists")."""
    if path.exists():
        return
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while it built one
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
        engine.dispose()
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # unlike a rename, never replaces a store another process has made meanwhile
    finally:
        engine.dispose()
        tmp.unlink(missing_ok=True)


def artifact_root() -> str | None:
    """For a SQLite store, artifacts go to `mlruns/` beside the database file (not wherever the process runs)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns")
    return None


def experiment_id(c: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created when missing (tolerates a concurrent creator)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root()
    try:
        return c.create_experiment(name, artifact_location=(Path(root) / name).as_uri() if root else None)
    except mlflow.exceptions.MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def tracking_env() -> Iterator[None]:
    """Make MLflow's fluent helpers (used inside log_model) see our tracking URI, without touching global state."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _uri(c: MlflowClient) -> str:
    return getattr(getattr(c, "_tracking_client", None), "tracking_uri", None) or tracking_uri()
