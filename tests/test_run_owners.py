"""Runs end with their owners, and metrics outlive an MLflow outage: the unit-level half of the fault guarantees
(README, "What happens when things go wrong"; the faults made on purpose with real processes and servers are in
test_faults.py).

- an owner (a process, or another host's heartbeat) is alive exactly while it runs; a start ends the RUNNING runs of
  dead owners KILLED, and a resumed run moves under its new parent; interrupts and signals end runs KILLED, errors
  FAILED; a new SQLite store appears whole or not at all; the pipeline says what a training waits for;
- metrics logged while MLflow is away are kept, spooled at a checkpoint and sent once; a run's end waits for MLflow
  a while, then says where the unsent metrics are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.infra import metric_buffer, procs, tracking

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- owners
def test_an_owner_is_alive_exactly_while_its_process_runs():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = procs.owner(child.pid)
        assert procs.alive(tag) is True and procs.alive(procs.owner()) is True
    finally:
        child.kill()
        child.wait()
    assert procs.alive(tag) is False
    host, boot, pid, start = tag.split("/")
    assert procs.alive(f"{host}/{boot}/{os.getpid()}/{int(start) + 1}") is False  # the pid, reused by another process
    assert procs.alive(f"another-host/{boot}/{os.getpid()}/1") is None  # cannot be told from here
    assert procs.alive("not an owner") is None


def _dead_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tag = procs.owner(child.pid)
    child.kill()
    child.wait()
    return tag


def test_a_start_ends_the_runs_of_dead_owners_and_a_resumed_run_moves_under_its_new_parent(tmp_path):
    c = tracking.client()
    exp = tracking.experiment_id(c, "owners")
    dead = _dead_owner()
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old_parent = c.create_run(exp, run_name="pipeline-killed", tags={tracking.OWNER_TAG: dead}).info.run_id
        train = c.create_run(exp, run_name="train-vit", tags={tracking.OWNER_TAG: dead,
                                                              tracking.PARENT_TAG: old_parent}).info.run_id
        busy = c.create_run(exp, run_name="elsewhere", tags={tracking.OWNER_TAG: procs.owner(living.pid)}).info.run_id
        remote = c.create_run(exp, run_name="remote", tags={tracking.OWNER_TAG: "gpu-node-7/abc/12/34"}).info.run_id
        with tracking.start_run("owners", "pipeline-new") as parent:
            status = {r: c.get_run(r).info.status for r in (old_parent, train, busy, remote)}
            assert status == {old_parent: "KILLED", train: "KILLED", busy: "RUNNING", remote: "RUNNING"}
            assert "its owner was gone" in c.get_run(train).data.tags["tessera.closed_by"]
            with tracking.start_run("owners", "train-vit", parent.run_id, run_id=train) as resumed:
                run = c.get_run(resumed.run_id)
                assert run.info.status == "RUNNING" and run.data.tags[tracking.PARENT_TAG] == parent.run_id
                assert run.data.tags[tracking.OWNER_TAG] == procs.owner()
        assert c.get_run(train).info.status == "FINISHED" and c.get_run(parent.run_id).info.status == "FINISHED"
    finally:
        living.kill()
        living.wait()


def test_runs_of_other_hosts_end_when_their_heartbeat_stops(monkeypatch):
    """Another host's process cannot be checked from here: its runs end once their heartbeat is stale, not before."""
    c = tracking.client()
    exp = tracking.experiment_id(c, "heartbeats")
    now = int(time.time())

    def run(name: str, beat: int | None) -> str:
        tags = {tracking.OWNER_TAG: "gpu-node-7/abc/12/34", **({tracking.HEARTBEAT_TAG: str(beat)} if beat else {})}
        return c.create_run(exp, run_name=name, tags=tags).info.run_id

    stale, fresh, old_style = run("stale", now - 901), run("fresh", now - 60), run("no heartbeat", None)
    assert tracking.close_dead_owners(c, exp) == [stale]
    assert [c.get_run(r).info.status for r in (stale, fresh, old_style)] == ["KILLED", "RUNNING", "RUNNING"]
    assert "no heartbeat from gpu-node-7/abc/12/34 for 15 min" in c.get_run(stale).data.tags["tessera.closed_by"]
    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.2)  # an open run's heartbeat is renewed while it is open
    with tracking.start_run("heartbeats", "beating") as mine:
        first = int(c.get_run(mine.run_id).data.tags[tracking.HEARTBEAT_TAG])
        tracking._WAKE.set()  # a heartbeat thread already waiting its 60 s reads the new period
        time.sleep(1.5)
        assert int(c.get_run(mine.run_id).data.tags[tracking.HEARTBEAT_TAG]) > first


def test_interrupts_and_signals_end_runs_killed_errors_failed(tmp_path):
    from prefect.exceptions import TerminationSignal

    assert tracking.end_status(None) == "FINISHED" and tracking.end_status(ValueError()) == "FAILED"
    for exc in (KeyboardInterrupt(), SystemExit(1), TerminationSignal(signal.SIGTERM), tracking.Interrupted()):
        assert tracking.end_status(exc) == "KILLED", exc
    # SIGHUP (a closed terminal) ends a run KILLED instead of leaving it RUNNING
    # the child starts with SIGHUP at its default action, as from a terminal: under `nohup make test` it inherits
    # SIG_IGN, which tracking rightly leaves alone (the user asked to survive a hang-up)
    code = ("import signal, sys, time\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\nfrom tasks.infra import tracking\n"
            "with tracking.start_run('hup', 'r') as run:\n"
            "    print(run.run_id, flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        run_id = child.stdout.readline().strip()
        child.send_signal(signal.SIGHUP)
        assert child.wait(timeout=60) != 0
    finally:
        child.kill()
    assert tracking.client().get_run(run_id).info.status == "KILLED"


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow builds its tables in place over seconds; a process killed meanwhile left a store no start could open."""
    import mlflow.store.db.utils as db_utils

    db = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    real = db_utils._initialize_tables

    def dies_half_way(engine):
        real.__globals__["InitialBase"].metadata.create_all(engine)  # the first tables, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(db_utils, "_initialize_tables", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        tracking.client()
    assert not db.exists()
    monkeypatch.setattr(db_utils, "_initialize_tables", real)
    c = tracking.client()
    assert db.exists() and c.get_experiment_by_name("Default") is not None
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]


def test_the_pipeline_says_what_a_training_waits_for():
    import inspect

    from flows.pipeline import pipeline

    assert "train_slot_watch(runtime.flow_run.id)" in inspect.getsource(pipeline.fn)


# ---------------------------------------------------------------------------------------------------- metric buffer
class FlakyClient:
    """An MlflowClient whose log_batch fails like a server that is down, while `down` is set."""

    def __init__(self, real: MlflowClient):
        self.real, self.down, self.calls = real, False, 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.down:
            raise tracking.mlflow.exceptions.MlflowException("API request failed: Max retries exceeded")
        return self.real.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_metrics_are_kept_while_mlflow_is_away_spooled_at_a_checkpoint_and_sent_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metric_buffer, "RETRY_MAX_S", 0.2)  # read by MetricBuffer's sender, in its module
    real = tracking.client()
    run_id = real.create_run(tracking.experiment_id(real, "buffer")).info.run_id
    flaky = FlakyClient(real)
    buf = tracking.MetricBuffer(flaky, run_id, spool=tmp_path / tracking.SPOOL)
    for step in (1, 2):
        buf.add({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    assert buf.flush() is True  # a checkpoint: everything stored before it
    flaky.down = True
    for step in (3, 4, 5):
        buf.add({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
        buf.flush(wait=False)  # never raises, never waits
    t0 = time.monotonic()
    assert buf.flush() is False and time.monotonic() - t0 < 5  # a checkpoint while away: spooled, not waited for
    spooled = [json.loads(line) for line in (tmp_path / tracking.SPOOL).read_text().splitlines()]
    assert sorted({r["step"] for r in spooled}) == [3, 4, 5]
    err = capsys.readouterr().err
    assert err.count("does not answer") == 1 and "training goes on" in err
    # the process dies here; a resumed attempt sends the spool first and counts it as logged
    resumed = tracking.Run(run_id, real, resumed=True, spool=tmp_path / tracking.SPOOL)
    assert resumed.last_step("train/loss") == 5
    resumed.catch_up(timeout=30)
    assert not (tmp_path / tracking.SPOOL).exists()
    history = real.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]  # each once: MLflow keeps one of identical metrics
    # the first buffer's sender, still retrying, sends the same metrics again when MLflow is back: stored once
    flaky.down = False
    assert buf.close(timeout=30) is True
    assert sorted(m.step for m in real.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4, 5]
    assert "answers again" in capsys.readouterr().err


def test_a_run_end_waits_for_mlflow_then_says_where_the_metrics_are(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metric_buffer, "RETRY_MAX_S", 0.2)  # read by MetricBuffer's sender, in its module
    real = tracking.client()
    run_id = real.create_run(tracking.experiment_id(real, "catchup")).info.run_id
    flaky = FlakyClient(real)
    flaky.down = True
    run = tracking.Run(run_id, flaky, resumed=False, spool=tmp_path / tracking.SPOOL)
    run.metrics.add({"train/loss": 1.0}, 1)
    with pytest.raises(tracking.TrackingUnavailable, match="kept in .*mlflow-unsent.jsonl"):
        run.catch_up(timeout=3)
    assert "waiting up to 3 s for MLflow" in capsys.readouterr().err
    assert (tmp_path / tracking.SPOOL).is_file()
