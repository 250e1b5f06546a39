"""MLflow runs: start or resume one, end it with the right status, never leave it RUNNING.

Everything goes through an explicit `MlflowClient` and run id rather than MLflow's fluent "active run" stack: the
stack is shared by the threads Prefect runs tasks in, so two trainings side by side would end each other's runs.
A fluent run that is active in the caller (a flow's parent run) is still picked up as the parent.

The MLflow helpers are three modules; this one is the way in and re-exports the other two's names:
- tasks/infra/tracking_store.py: one tracking URI (the store, the client, artifacts, experiments by name);
- tasks/infra/metric_buffer.py: metrics that survive a tracking outage (sent from a thread, kept, spooled).

What happens when things go wrong:
- Tracking never stops a training: see tasks/infra/metric_buffer.py. At the end a run waits, at most catchup_s()
  seconds and saying so, for the server to take the metrics it has kept (Run.catch_up).
- Runs never stay RUNNING for good. A run ends FINISHED, FAILED, or KILLED on interrupts and signals (Ctrl-C,
  SIGTERM, SIGHUP, Prefect's termination signal); runs still open when the interpreter exits end KILLED. A process
  that dies without a word (SIGKILL, power loss) cannot end its runs, so every run carries its owner (`OWNER_TAG`:
  host, boot, pid, process start time, tasks/infra/procs.py) and the next start in the experiment ends the RUNNING
  runs whose owner on this host is gone (KILLED, tagged `tessera.closed_by`). A run owned on another host cannot be
  checked from here; its owner renews a heartbeat tag every minute while the run is open, and a start ends it once
  the heartbeat is older than TESSERA_RUN_STALE_S (15 minutes; clocks are assumed in sync, and an MLflow outage that
  long on that host looks the same: its run then ends as FINISHED or FAILED when its owner closes it). A resumed run
  takes the new owner and, given a parent, moves under it (`mlflow.parentRunId`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunStatus, RunTag

from tasks.infra import procs
# Re-exported: callers and tests reach the store and the metric buffer through this module.
from tasks.infra.metric_buffer import SETTLE_S, SPOOL, MetricBuffer, say
from tasks.infra.tracking_store import _uri, artifact_root, client, experiment_id, tracking_env, tracking_uri

PARENT_TAG = "mlflow.parentRunId"
OWNER_TAG = "tessera.owner"  # procs.owner() of the process the run belongs to now
HEARTBEAT_TAG = "tessera.heartbeat"  # unix seconds, renewed every HEARTBEAT_S while the run is open
HEARTBEAT_S = 60.0
DATASET_TAG, DIGEST_TAG = "tessera.dataset", "tessera.dataset_digest"  # on the pipeline's run, set by the flow
INHERITED = (DATASET_TAG, DIGEST_TAG)  # a nested run carries its parent's
MAX_PARAM_LEN = 6000

# The temporary Prefect server a flow of this process may start ends with the process (see procs.py). Installed
# here because every command that runs a flow imports this module first; flows/cli.py's main() is its natural home.
procs.guard_temporary_server()


def catchup_s() -> float:
    """How long a run's end waits for MLflow to take what it has kept: TESSERA_MLFLOW_CATCHUP_S, default 300 s."""
    return float(os.environ.get("TESSERA_MLFLOW_CATCHUP_S", "300"))


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


class TrackingUnavailable(RuntimeError):
    """MLflow did not take a run's metrics within the catch-up time; where they are kept is in the message."""


@dataclass
class Run:
    """A handle on one MLflow run: its id, the client, and a metric buffer (spooled in `spool` when given)."""

    run_id: str
    client: MlflowClient
    resumed: bool
    spool: Path | None = None
    metrics: MetricBuffer = field(init=False)

    def __post_init__(self):
        self.metrics = MetricBuffer(self.client, self.run_id, spool=self.spool)

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
        """The highest step of metric `key` that is stored or kept to be sent (-1 when none): where an earlier
        attempt's log ends."""
        kept = self.metrics.kept_step(key)  # first: a metric the sender stores meanwhile is then in the history
        history = self.client.get_metric_history(self.run_id, key)
        return max(max((m.step for m in history), default=-1), kept)

    def catch_up(self, timeout: float | None = None) -> None:
        """Wait (at most `timeout`, default catchup_s(), saying so) until MLflow has every metric flushed so far;
        TrackingUnavailable when it does not answer by then (the metrics stay in the spool file, if any)."""
        timeout = catchup_s() if timeout is None else timeout
        if self.metrics.close(timeout):
            return
        kept = (f"they are kept in {self.spool} and sent when this run is resumed (run the same command again)"
                if self.spool else "they are lost")
        raise TrackingUnavailable(f"MLflow at {_uri(self.client)} did not take {len(self.metrics.unsent)} metrics "
                                  f"of run {self.run_id} within {timeout:.0f} s; {kept}")


def end_status(exc: BaseException | None) -> str:
    """FINISHED; FAILED for errors (Exception); KILLED for interrupts and signals, which are BaseExceptions only
    (Ctrl-C, SIGTERM or SIGHUP turned into an exception, SystemExit, Prefect's TerminationSignal)."""
    if exc is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(exc, Exception):
        return RunStatus.to_string(RunStatus.FAILED)
    return RunStatus.to_string(RunStatus.KILLED)


# ---------------------------------------------------------------------------------------------------- owners
_OPEN: dict[str, Run] = {}  # the runs this process has open
_HEARTBEAT: threading.Thread | None = None
_WAKE = threading.Event()  # set: beat now (and read HEARTBEAT_S again)
_SWEPT: set[tuple[str, str]] = set()  # (tracking URI, experiment id) already swept by this process


def stale_s() -> float:
    """How long a run of another host may go without a heartbeat before a start ends it (TESSERA_RUN_STALE_S)."""
    return float(os.environ.get("TESSERA_RUN_STALE_S", "900"))


def _why_dead(run, now: float) -> str | None:
    """Why a RUNNING run is over, or None: its owner on this host is gone, or (another host) its heartbeat stopped."""
    owner = run.data.tags.get(OWNER_TAG, "")
    alive = procs.alive(owner)
    if alive is False:
        return "its owner was gone"
    beat = run.data.tags.get(HEARTBEAT_TAG)
    if alive is None and beat and beat.isdigit() and now - int(beat) > stale_s():
        return f"no heartbeat from {owner} for {(now - int(beat)) / 60:.0f} min"
    return None


def close_dead_owners(c: MlflowClient, experiment: str, keep: tuple[str, ...] = ()) -> list[str]:
    """End KILLED the RUNNING runs of experiment id `experiment` that nobody runs any more: their owner ran on this
    host and is gone, or ran on another host and its heartbeat (`HEARTBEAT_TAG`, every HEARTBEAT_S while the run is
    open) is older than stale_s(). Returns their ids."""
    found = c.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000)
    now = time.time()
    dead = {r.info.run_id: why for r in found if r.info.run_id not in keep and (why := _why_dead(r, now))}
    for run_id, why in dead.items():
        c.set_tag(run_id, "tessera.closed_by", f"{procs.owner()}: {why}")
        c.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return list(dead)


def _beat() -> None:
    """The heartbeat thread: every HEARTBEAT_S, the time on each run this process has open (an outage skips beats)."""
    while True:
        _WAKE.wait(HEARTBEAT_S)
        _WAKE.clear()
        for run in list(_OPEN.values()):
            with contextlib.suppress(Exception):
                run.client.set_tag(run.run_id, HEARTBEAT_TAG, str(int(time.time())))


def _start_heartbeat() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is None or not _HEARTBEAT.is_alive():
        _HEARTBEAT = threading.Thread(target=_beat, name="tessera-mlflow-heartbeat", daemon=True)
        _HEARTBEAT.start()


def _sweep_once(c: MlflowClient, experiment: str, keep: tuple[str, ...] = ()) -> None:
    key = (tracking_uri(), experiment)
    if key not in _SWEPT:
        if dead := close_dead_owners(c, experiment, keep):
            say(f"ended {len(dead)} MLflow run(s) KILLED whose process was gone: {', '.join(dead)}")
        _SWEPT.add(key)


@atexit.register
def _end_open_runs() -> None:
    """Runs still open when the interpreter exits (a generator never closed, a daemon thread): KILLED."""
    for run in list(_OPEN.values()):
        with contextlib.suppress(Exception):
            run.client.set_terminated(run.run_id, RunStatus.to_string(RunStatus.KILLED))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while a run is open (and nothing else handles the signal): an interrupt, so runs end KILLED."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """In the main thread: SIGTERM and SIGHUP raise Interrupted while they would otherwise kill the process silently
    (their default action); a handler someone else installed (Prefect's, the trainer's) is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"received signal {signum}")

    mine = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)
            mine[sig] = handler
    try:
        yield
    finally:
        for sig in mine:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, signal.SIG_DFL)


def inherited_tags(c: MlflowClient, parent_run_id: str) -> dict[str, str]:
    """The tags a nested run takes from its parent: the dataset's name and digest (`INHERITED`)."""
    return {k: v for k, v in c.get_run(parent_run_id).data.tags.items() if k in INHERITED}


def _resume(c: MlflowClient, run_id: str, parent_run_id: str | None, spool: Path | None) -> Run:
    """Run `run_id` continued: RUNNING again, owned by this process, under `parent_run_id` when given."""
    try:
        run = c.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"MLflow run {run_id}, which this training continues, is not in the tracking store "
                         f"{tracking_uri()}; set MLFLOW_TRACKING_URI to the store it was started in, or delete "
                         "the output folder to start over") from exc
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow run {run_id} was deleted; remove the output folder to start a new run")
    _sweep_once(c, run.info.experiment_id, keep=(run_id,))
    tags = {OWNER_TAG: procs.owner(), HEARTBEAT_TAG: str(int(time.time()))}
    if parent_run_id and run.data.tags.get(PARENT_TAG) != parent_run_id:
        tags[PARENT_TAG] = parent_run_id  # the parent it was started under may be gone (a killed pipeline)
        tags.update(inherited_tags(c, parent_run_id))
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return Run(run_id, c, resumed=True, spool=spool)


def _create(c: MlflowClient, experiment: str, run_name: str, parent_run_id: str | None, tags: dict | None,
            spool: Path | None) -> Run:
    if parent_run_id is None and (active := mlflow.active_run()) is not None:
        parent_run_id = active.info.run_id
    all_tags = {**(tags or {}), OWNER_TAG: procs.owner(), HEARTBEAT_TAG: str(int(time.time()))}
    if parent_run_id:
        all_tags = {**inherited_tags(c, parent_run_id), **all_tags, PARENT_TAG: parent_run_id}
    exp = experiment_id(c, experiment)
    _sweep_once(c, exp)
    run = c.create_run(exp, run_name=run_name, tags=all_tags)
    return Run(run.info.run_id, c, resumed=False, spool=spool)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    spool_dir: Path | None = None,
) -> Iterator[Run]:
    """Create (or, given `run_id`, resume) a run; end it FINISHED, FAILED or KILLED, never leave it RUNNING.

    parent_run_id: makes this a nested run (the `mlflow.parentRunId` tag the UI nests by). When None and the caller
    has an active fluent run (a flow's parent run), that one is the parent. A resumed run moves under it.
    run_id: an existing run to continue (after a crash); its status goes back to RUNNING. It must not be deleted.
    spool_dir: a folder of the run's own (a training's output folder) where metrics MLflow has not taken are kept
    across a crash (`SPOOL`); a resumed run sends them first.
    The first start in an experiment ends the runs of dead owners (see the module docstring). At the end the run
    waits up to catchup_s() for MLflow to take its metrics, and raises TrackingUnavailable if it does not.
    """
    c = client()
    spool = Path(spool_dir) / SPOOL if spool_dir is not None else None
    handle = (_resume(c, run_id, parent_run_id, spool) if run_id is not None
              else _create(c, experiment, run_name, parent_run_id, tags, spool))
    _OPEN[handle.run_id] = handle
    _start_heartbeat()
    try:
        with _signals_interrupt():
            yield handle
        handle.catch_up()
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the original error matters more than a failed bookkeeping call
            handle.metrics.close(min(SETTLE_S, catchup_s()), while_away=False)
        with contextlib.suppress(Exception):
            c.set_terminated(handle.run_id, end_status(exc))
        raise
    else:
        c.set_terminated(handle.run_id, end_status(None))
    finally:
        _OPEN.pop(handle.run_id, None)
