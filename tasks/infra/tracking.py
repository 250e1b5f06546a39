"""MLflow helpers: one tracking URI, runs that never stay RUNNING, metrics logged in batches.

Everything goes through an explicit `MlflowClient` and run id rather than MLflow's fluent "active run" stack: the
stack is shared by the threads Prefect runs tasks in, so two trainings side by side would end each other's runs.
A fluent run that is active in the caller (a flow's parent run) is still picked up as the parent.

Tracking URI: `MLFLOW_TRACKING_URI` when set; otherwise MLflow 3's own default, a SQLite file `mlflow.db` in the
working directory, written out as an absolute `sqlite:///<cwd>/mlflow.db` so that every client of this process
agrees on it (MLflow itself silently switches to `./mlruns` when such a folder holds old file-store data).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow
import torch
import torch.nn as nn
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag

PARENT_TAG = "mlflow.parentRunId"
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_PARAM_LEN = 6000


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or sqlite:///<cwd>/mlflow.db (MLflow 3's default store, made explicit)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


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


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested configs as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class MetricBuffer:
    """Collects (key, value, step) and sends them with one `log_batch` call per flush.

    Values may be 0-d tensors: they are converted at flush time, so a GPU training loop does not synchronise on every
    `add`. `skip_through` drops steps already recorded by an earlier (killed) attempt of the same run.
    `flush(wait=False)` sends in the background (MLflow's async logging): a synchronous log_batch to a SQLite store
    took 70-500 ms here, 9% of a default ViT's training loop at one flush per 10 steps (benchmarks/orchestration.py).
    """

    def __init__(self, c: MlflowClient, run_id: str, skip_through: int = -1):
        self.client, self.run_id, self.skip_through = c, run_id, skip_through
        self.pending: list[tuple[str, Any, int, int]] = []
        self.in_flight: list[Any] = []  # RunOperations of background sends not yet waited for

    def add(self, metrics: dict[str, Any], step: int) -> None:
        if step <= self.skip_through:
            return
        ts = int(time.time() * 1000)
        self.pending.extend((k, v, ts, step) for k, v in metrics.items())

    def flush(self, wait: bool = True) -> None:
        """Send what is buffered. wait=True: return once everything sent so far is stored (before a checkpoint, so a
        resumed run never lacks steps its checkpoint is past); wait=False: send in the background and return."""
        if wait:
            for op in self.in_flight:
                op.wait()
            self.in_flight.clear()
        if not self.pending:
            return
        metrics = [Metric(k, float(v), ts, step) for k, v, ts, step in self.pending]
        for i in range(0, len(metrics), MAX_BATCH):
            op = self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_BATCH], synchronous=wait)
            if not wait:
                self.in_flight.append(op)
        self.pending.clear()


@dataclass
class Run:
    """A handle on one MLflow run: its id, the client, and a metric buffer."""

    run_id: str
    client: MlflowClient
    resumed: bool
    metrics: MetricBuffer = field(init=False)

    def __post_init__(self):
        self.metrics = MetricBuffer(self.client, self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100], synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "train") -> None:
        """Input lineage: the run read dataset `name` with content digest `digest` from `source`."""
        ds = Dataset(name=name, digest=digest, source_type="local", source=source)
        self.client.log_inputs(self.run_id, [DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def last_step(self, key: str) -> int:
        """The highest step logged for metric `key` (-1 when none): where an earlier attempt's log ends."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)


def end_status(exc: BaseException | None) -> str:
    """FINISHED, KILLED for interrupts (Ctrl-C, SIGTERM turned into an exception, SystemExit), FAILED otherwise."""
    if exc is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Iterator[Run]:
    """Create (or, given `run_id`, resume) a run; end it FINISHED, FAILED or KILLED, never leave it RUNNING.

    parent_run_id: makes this a nested run (the `mlflow.parentRunId` tag the UI nests by). When None and the caller
    has an active fluent run (a flow's parent run), that one is the parent.
    run_id: an existing run to continue (after a crash); its status goes back to RUNNING. It must not be deleted.
    """
    c = client()
    if run_id is not None:
        try:
            run = c.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise ValueError(f"MLflow run {run_id}, which this training continues, is not in the tracking store "
                             f"{tracking_uri()}; set MLFLOW_TRACKING_URI to the store it was started in, or delete "
                             "the output folder to start over") from exc
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow run {run_id} was deleted; remove the output folder to start a new run")
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        handle = Run(run_id, c, resumed=True)
    else:
        if parent_run_id is None and (active := mlflow.active_run()) is not None:
            parent_run_id = active.info.run_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=all_tags)
        handle = Run(run.info.run_id, c, resumed=False)
    try:
        yield handle
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the original error matters more than a failed bookkeeping call
            handle.metrics.flush()
        with contextlib.suppress(Exception):
            c.set_terminated(handle.run_id, end_status(exc))
        raise
    handle.metrics.flush()
    c.set_terminated(handle.run_id, end_status(None))


class _OneInput(nn.Module):
    """Positional adapter for export: forward(x) -> model({key: x})[0] (our models take a batch dict)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x):
        return self.model({self.keys[0]: x})[0]


class _TwoInputs(_OneInput):
    def forward(self, x, y):
        return self.model({self.keys[0]: x, self.keys[1]: y})[0]


def log_model(model: nn.Module, name: str, registered_name: str | None, run_id: str,
              example: dict[str, torch.Tensor]) -> dict:
    """Log a model as an MLflow 3 LoggedModel of run `run_id` and register it in the Model Registry.

    MLflow 3 takes `name=` (`artifact_path=` is deprecated) and saves PyTorch models as a `torch.export` program
    ("pt2") by default, which loads without unpickling code. Export needs positional tensors, so the model is
    wrapped to take the `example` batch's tensors in order (e.g. image; or src, tgt) and return the model's output;
    the signature is inferred from the example (batch dimension dynamic: give at least two rows). Requirements are
    given, not inferred (inference re-imports the model in a subprocess, which is slow).
    Returns {"model_uri", "registered_name", "version"}.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    keys = list(example)
    if len(keys) not in (1, 2):
        raise ValueError(f"log_model takes a one- or two-tensor example batch, got keys {keys}")
    wrapped = (_OneInput if len(keys) == 1 else _TwoInputs)(model.eval(), keys)
    tensors = tuple(example[k].cpu() for k in keys)
    with torch.no_grad():
        output = wrapped(*tensors)
    signature = infer_signature({k: t.numpy() for k, t in zip(keys, tensors)}, output.float().numpy())
    c = client()
    # the LoggedModel belongs in the run's experiment (log_model alone puts it in the fluent active experiment,
    # "Default", with its artifacts under the working directory)
    logged = c.create_logged_model(c.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id)
    with _tracking_env():
        info = mlflow.pytorch.log_model(
            wrapped,
            name=name,
            model_id=logged.model_id,
            registered_model_name=registered_name,
            run_id=run_id,
            input_example=tuple(t.numpy() for t in tensors),
            signature=signature,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return {"model_uri": info.model_uri, "registered_name": registered_name,
            "version": getattr(info, "registered_model_version", None)}


@contextlib.contextmanager
def _tracking_env() -> Iterator[None]:
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
