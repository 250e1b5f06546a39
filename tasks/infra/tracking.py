"""MLflow helpers: one tracking URI, runs that end with the right status, metrics that survive a tracking outage.

Everything goes through an explicit `MlflowClient` and run id rather than MLflow's fluent "active run" stack: the
stack is shared by the threads Prefect runs tasks in, so two trainings side by side would end each other's runs.
A fluent run that is active in the caller (a flow's parent run) is still picked up as the parent.

Tracking URI: `MLFLOW_TRACKING_URI` when set; otherwise MLflow 3's own default, a SQLite file `mlflow.db` in the
working directory, written out as an absolute `sqlite:///<cwd>/mlflow.db` so that every client of this process
agrees on it (MLflow itself silently switches to `./mlruns` when such a folder holds old file-store data).

What happens when things go wrong:
- Tracking never stops a training. Metrics go to MLflow from a sender thread; what the server does not take (it is
  down past the client's own retries) stays in memory and is retried with back-off, with one warning on stderr when
  the server goes away and one when it answers again. Before a checkpoint the trainer flushes with wait=True: that
  returns once everything is stored, or at once while the server is away, with what is not stored written to the
  run's spool file (`SPOOL` in the output folder), so a run resumed from that checkpoint sends it and never lacks a
  step. At the end a run waits, at most CATCHUP_S seconds and saying so, for the server to take the rest.
  Resending is safe: MLflow stores a metric (key, value, timestamp, step) that it already has only once.
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
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag

from tasks.infra import procs

PARENT_TAG = "mlflow.parentRunId"
OWNER_TAG = "tessera.owner"  # procs.owner() of the process the run belongs to now
HEARTBEAT_TAG = "tessera.heartbeat"  # unix seconds, renewed every HEARTBEAT_S while the run is open
HEARTBEAT_S = 60.0
DATASET_TAG, DIGEST_TAG = "tessera.dataset", "tessera.dataset_digest"  # on the pipeline's run, set by the flow
INHERITED = (DATASET_TAG, DIGEST_TAG)  # a nested run carries its parent's
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_PARAM_LEN = 6000
SPOOL = "mlflow-unsent.jsonl"  # in a run's output folder: metrics MLflow had not taken at a checkpoint
SETTLE_S = 30.0  # a checkpoint waits at most this long for the metrics before it (none while the server is away)
RETRY_MAX_S = 10.0  # the longest pause between two tries to send kept metrics
# Refusals, not outages: sending the same batch again cannot help, so it is dropped with a warning.
REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}

# The temporary Prefect server a flow of this process may start ends with the process (see procs.py). Installed
# here because every command that runs a flow imports this module first; flows/cli.py's main() is its natural home.
procs.guard_temporary_server()


def catchup_s() -> float:
    """How long a run's end waits for MLflow to take what it has kept: TESSERA_MLFLOW_CATCHUP_S, default 300 s."""
    return float(os.environ.get("TESSERA_MLFLOW_CATCHUP_S", "300"))


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


def say(message: str) -> None:
    """One line on stderr (Prefect shows it in the task's log)."""
    print(f"tessera: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class TrackingUnavailable(RuntimeError):
    """MLflow did not take a run's metrics within the catch-up time; where they are kept is in the message."""


class MetricBuffer:
    """Collects (key, value, step); a sender thread sends them with one `log_batch` call per flush and keeps what
    the server does not take until it does (see the module docstring).

    Values may be 0-d tensors: they are converted at flush time, so a GPU training loop does not synchronise on every
    `add`. `skip_through` drops steps already recorded by an earlier (killed) attempt of the same run. `spool`: the
    file that holds what is not stored at a checkpoint (None: nothing is written to disk). Sending from a thread
    keeps a training loop off the network: a log_batch to a SQLite store took 70-500 ms here, 9% of a default ViT's
    loop at one flush per 10 steps (benchmarks/orchestration.py).
    """

    def __init__(self, c: MlflowClient, run_id: str, skip_through: int = -1, spool: Path | None = None):
        self.client, self.run_id, self.skip_through, self.spool = c, run_id, skip_through, spool
        self.pending: list[tuple[str, Any, int, int]] = []  # added since the last flush
        self.unsent: list[Metric] = []  # flushed, not stored yet; the sender sends from the head
        self.away_since: float | None = None  # time.monotonic() when the server stopped answering; None: it answers
        self.stored = 0
        self._cond = threading.Condition()
        self._sender: threading.Thread | None = None
        self._stop = False
        self._take_spool()

    def add(self, metrics: dict[str, Any], step: int) -> None:
        if step <= self.skip_through:
            return
        ts = int(time.time() * 1000)
        self.pending.extend((k, v, ts, step) for k, v in metrics.items())

    def flush(self, wait: bool = True, timeout: float = SETTLE_S) -> bool:
        """Hand what is buffered to the sender. wait=True: return once everything flushed so far is stored, or, while
        the server is away or after `timeout` seconds, once what is not stored is in the spool file. Never raises;
        True when everything is stored."""
        metrics = [Metric(k, float(v), ts, step) for k, v, ts, step in self.pending]
        self.pending.clear()
        with self._cond:
            self.unsent.extend(metrics)
            if self.unsent:
                self._start()
                self._cond.notify_all()
            return self._settle(timeout) if wait else not self.unsent

    def close(self, timeout: float, while_away: bool = True) -> bool:
        """Flush, then wait up to `timeout` seconds (saying so when it takes a while) until MLflow has everything, and
        stop the sender; while_away=False: stop waiting as soon as the server is known to be away. False when
        something is left: it is in the spool file, when there is one."""
        self.flush(wait=False)
        with self._cond:
            done = self._settle(min(2.0, timeout), while_away)
            if not done and (while_away or self.away_since is None) and timeout > 2.0:
                say(f"waiting up to {timeout:.0f} s for MLflow at {_uri(self.client)} to take {len(self.unsent)} "
                    f"metrics of run {self.run_id}")
                done = self._settle(timeout - 2.0, while_away)
            self._stop = True
            self._cond.notify_all()
            return done

    def kept_step(self, key: str) -> int:
        """The highest step of `key` among the metrics not stored yet (-1 when none)."""
        with self._cond:
            return max((m.step for m in self.unsent if m.key == key), default=-1)

    # -------------------------------------------------------------------------------- the sender and the spool
    def _start(self) -> None:
        """(Lock held.) A sender thread, unless one runs."""
        self._stop = False
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{self.run_id[:8]}",
                                            daemon=True)
            self._sender.start()

    def _settle(self, timeout: float, while_away: bool = False) -> bool:
        """(Lock held.) Wait until nothing is unsent, the timeout passes, or (unless while_away) the server is away;
        then spill what is left. True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self.unsent and (while_away or self.away_since is None):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        if self.unsent:
            self._spill()
        return not self.unsent

    def _send_loop(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self.unsent and not self._stop:
                    self._cond.wait()
                if self._stop:
                    self._sender = None  # under the lock: a flush after this starts a new sender
                    return
                batch = self.unsent[:MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as exc:  # noqa: BLE001 - whatever the client raises, the training goes on
                if getattr(exc, "error_code", None) in REFUSED:
                    say(f"MLflow refused {len(batch)} metrics of run {self.run_id} ({_first_line(exc)}); dropped")
                    self._sent(batch, refused=True)
                    continue
                self._went_away(exc)
                with self._cond:
                    self._cond.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            delay = 1.0
            self._sent(batch)

    def _sent(self, batch: list[Metric], refused: bool = False) -> None:
        with self._cond:
            del self.unsent[: len(batch)]
            if not refused:
                self.stored += len(batch)
                if self.away_since is not None:
                    say(f"MLflow at {_uri(self.client)} answers again after {time.monotonic() - self.away_since:.0f} "
                        f"s; sending the {len(self.unsent) + len(batch)} metrics kept for run {self.run_id}")
                    self.away_since = None
            if not self.unsent and self.spool is not None:
                self.spool.unlink(missing_ok=True)
            self._cond.notify_all()

    def _went_away(self, exc: Exception) -> None:
        with self._cond:
            if self.away_since is None:
                self.away_since = time.monotonic()
                say(f"MLflow at {_uri(self.client)} does not answer ({_first_line(exc)}); training goes on, its "
                    f"metrics are kept ({len(self.unsent)} so far) and sent when MLflow answers again")
            self._cond.notify_all()

    def _spill(self) -> None:
        """(Lock held.) Write every unsent metric to the spool file, atomically."""
        if self.spool is None:
            return
        lines = [json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                             "step": m.step}) for m in self.unsent]
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.spool.with_name(f".{self.spool.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.spool)

    def _take_spool(self) -> None:
        """Metrics an earlier attempt of this run kept in the spool file go first (those MLflow has already are
        stored once)."""
        if self.spool is None or not self.spool.is_file():
            return
        rows = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        self.unsent = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows
                       if r.get("run_id") == self.run_id]
        if self.unsent:
            with self._cond:
                self._start()


def _uri(c: MlflowClient) -> str:
    return getattr(getattr(c, "_tracking_client", None), "tracking_uri", None) or tracking_uri()


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
