"""Faults, on purpose: SIGKILL, a tracking server that goes away, a Prefect server that restarts.

Every test says which guarantee it checks (README, "What happens when things go wrong"):
- a killed command leaves no process behind (its temporary Prefect server and loader workers end with it), the next
  start ends its RUNNING runs KILLED, and the resumed training moves under the new parent run;
- MLflow down for longer than the client's own retries never stops a training: it finishes and every metric arrives;
- a Prefect server restart while a training holds the GPU slot does not leak the slot: the next training runs, and
  while it waits it says what it waits for.

Servers run on 127.0.0.1 from this venv, each in a session of its own, and a fixture stops everything a test started,
also when it fails (the two tests with a server of their own are marked `servers`). The points where a process is
killed are drawn from TESSERA_FAULT_SEED (default 15; the seed is in every failure message). The file takes about two
and a half minutes on a busy 2-core machine, the SIGKILL test one of them.
Their unit-level halves (owners and heartbeats, the metric buffer) are in test_run_owners.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows import deploy as deploy_lib
from tasks.infra import procs, tracking
from tests import processes
from tests.helpers import TINY_TRAIN, make_prep
from tests.processes import BIN, ROOT, Proc, alive, cmdline, free_port, http_ok, stop

SEED = int(os.environ.get("TESSERA_FAULT_SEED", "15"))
STARTUP_S = 120


# ---------------------------------------------------------------------------------------------------- processes
@pytest.fixture
def spawn(tmp_path):
    """spawn(cmd, env, name) starts a process in a session of its own, output to tmp/name.log; every process and
    descendant it started is stopped after the test, whatever happens."""
    started: list[Proc] = []

    def start(cmd: list[str], env: dict, name: str, cwd: Path = ROOT) -> Proc:
        started.append(proc := processes.start(cmd, env, tmp_path / f"{name}.log", cwd))
        return proc

    yield start
    for proc in started:
        stop(proc)


def _wait_for(cond, what: str, proc: Proc | None = None, timeout: float = STARTUP_S, every: float = 0.05):
    return processes.wait_for(cond, f"{what} (seed {SEED})", proc, timeout, every)


def _base_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
    return env


def _kill_and_check_nothing_is_left(proc: Proc, what: str) -> list[str]:
    """SIGKILL `proc` alone (not its group): every process it had started must end by itself. Returns the command
    lines of those processes."""
    kids = procs.descendants(proc.popen.pid)
    lines = [cmdline(pid) for pid in kids]
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(timeout=30)
    deadline = time.monotonic() + 30 + procs.GRACE_S
    while alive(kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: cmdline(pid) for pid in alive(kids)}
    assert not left, f"SIGKILL {what} (seed {SEED}) left processes without a parent: {left}"
    return lines


def _runs(c: MlflowClient, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


# ---------------------------------------------------------------------------------------------------- SIGKILL
KILL_STEPS, KILL_CKPT = 800, 100
SERVER = "prefect.server.api.server:create_app"  # on the command line of Prefect's temporary server


def _fault_config(tmp: Path) -> Path:
    cfg = {"data": {"root": str(tmp / "out"), "size": 16, "n_mels": 32, "n_frames": 64, "shard_maxcount": 32},
           "codebooks": {"pixels_k": 16, "image_k": 32},
           "train": {"preset": "tiny", "steps": KILL_STEPS, "patience": 0, "batch_size": 8, "device": "cpu",
                     "train_overrides": {"vit": {"ckpt_every": KILL_CKPT, "eval_every": KILL_CKPT, "log_every": 10}}},
           "eval": {"max_samples": 16, "roundtrips": False},
           "experiment": "faults"}
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_state(out: Path) -> dict:
    states = list((out / "train").glob("*/*/train.json"))
    return json.loads(states[0].read_text()) if states else {}


def test_sigkill_at_random_points_of_data_and_training_leaves_nothing_running(tmp_path, spawn):
    """`tessera train vit` (on a temporary Prefect server) is SIGKILLed at a seeded random point of its
    data stages, then at one of its training: no process outlives it; the third start ends the dead runs KILLED,
    resumes the training's own run under its new parent, and finishes with every step logged once."""
    rng = random.Random(SEED)
    env, cmd = _base_env(tmp_path), [str(BIN / "tessera"), "train", "vit", "--config", str(_fault_config(tmp_path))]
    out = tmp_path / "out"

    first = spawn(cmd, env, "run-1")
    _wait_for(lambda: (out / "builtin").exists(), "the data stages to start", first)
    time.sleep(rng.uniform(0.0, 2.0))
    started = _kill_and_check_nothing_is_left(first, "in the data stages")
    assert any(SERVER in line for line in started), started  # the temporary server was among them, and ended

    second = spawn(cmd, env, "run-2")
    target = rng.randint(1, KILL_STEPS // KILL_CKPT - 2) * KILL_CKPT
    _wait_for(lambda: _train_state(out).get("checkpoint_step", 0) >= target, f"the step-{target} checkpoint",
              second, timeout=240)
    time.sleep(rng.uniform(0.0, 0.3))
    killed_run = _train_state(out)["run_id"]
    started = _kill_and_check_nothing_is_left(second, f"after the step-{target} checkpoint")
    assert not list((out / "train").glob("*/*/_SUCCESS")), "the training ended before the kill; raise KILL_STEPS"
    assert any(SERVER in line for line in started), started

    third = spawn(cmd, env, "run-3")
    assert third.popen.wait(timeout=300) == 0, third.tail()
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = _runs(c, "faults")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = sorted((r for r in runs if r.info.run_name.startswith("pipeline-")), key=lambda r: r.info.start_time)
    assert [r.info.status for r in parents] == ["KILLED"] * (len(parents) - 1) + ["FINISHED"], seed_note(parents)
    (train,) = [r for r in runs if r.info.run_name == "train-vit"]
    assert train.info.run_id == killed_run and train.info.status == "FINISHED"  # the same run, continued
    assert train.data.tags[tracking.PARENT_TAG] == parents[-1].info.run_id  # under the parent that finished it
    assert "its owner was gone" in train.data.tags["tessera.closed_by"]
    steps = [m.step for m in c.get_metric_history(train.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, KILL_STEPS + 1))
    flows = _prefect_flow_runs(env)  # Prefect's record of the same three starts: the killed ones Crashed, not Running
    assert sorted(flows["pipeline"]) == ["COMPLETED", "CRASHED", "CRASHED"], flows
    assert "RUNNING" not in flows["data"] and flows["data"].count("COMPLETED") >= 1, flows  # killed inside it: CRASHED


PREFECT_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    names = {f.id: f.name for f in c.read_flows()}
    states = {}
    for r in c.read_flow_runs():
        states.setdefault(names[r.flow_id], []).append(r.state_type.value)
    print(json.dumps(states))
"""


def _prefect_flow_runs(env: dict) -> dict[str, list[str]]:
    """flow name -> the state types of its runs in the Prefect database of `env`'s PREFECT_HOME (a temporary server
    reads it)."""
    done = subprocess.run([sys.executable, "-c", PREFECT_RUNS], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADER_CHILD = """
import sys, time
from tasks.data import loader, shards
batches = loader.batches(shards.shard_urls(sys.argv[1], "image", "train"), 4, num_workers=1)
next(batches)
print("READY", flush=True)
time.sleep(120)
"""


def test_a_killed_training_process_takes_its_loader_worker_with_it(tmp_path, spawn):
    child = spawn([sys.executable, "-c", LOADER_CHILD, str(make_prep(tmp_path / "prep"))], _base_env(tmp_path),
                  "loader")
    _wait_for(lambda: "READY" in child.tail(), "the first batch", child, every=0.2)
    started = _kill_and_check_nothing_is_left(child, "with a DataLoader worker")
    assert len(started) == 1, started  # the worker, ended by torch's own watchdog


def test_the_temporary_server_is_guarded_when_prefect_imports_it_not_before():
    code = ("import sys\nimport tasks.infra.tracking\nassert 'prefect.server.api.server' not in sys.modules\n"
            "from prefect.server.api import server\nprint(type(server.subprocess).__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "_GuardedSubprocess", done.stdout + done.stderr[-2000:]
    assert procs.guarded_argv(["python", "-m", "uvicorn", "x"])[1:2] == ["-c"]
    assert procs.guarded_argv(["prefect", "deploy"]) == ["prefect", "deploy"]  # not `python -m`: as it is


def seed_note(runs) -> str:
    return f"seed {SEED}: " + ", ".join(f"{r.info.run_name} {r.info.status}" for r in runs)


# ---------------------------------------------------------------------------------------------------- MLflow outage
OUTAGE_CHILD = """
import json, sys, time
import tasks.train.trainer as T
args = json.loads(sys.argv[1])
get_lr = T.get_lr
def slow_get_lr(step, cfg):  # once per step: a run long enough for an outage in its middle
    time.sleep(args["sleep"])
    return get_lr(step, cfg)
T.get_lr = slow_get_lr
record = T.train("ast", args["prep"], args["out"], T.TrainConfig(**args["cfg"]), preset="tiny", experiment="outage")
print("RECORD", json.dumps(record), flush=True)
"""


def _mlflow_server(spawn, tmp: Path, port: int, name: str) -> Proc:
    env = {**_base_env(tmp), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = spawn([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{tmp}/mlflow-server.db", "--artifacts-destination",
                  str(tmp / "mlartifacts")], env, name, cwd=tmp)
    _wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), "the MLflow server", proc, every=0.3)
    return proc


@pytest.mark.servers
def test_mlflow_down_past_the_client_retries_training_finishes_and_every_metric_arrives(tmp_path, spawn):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(spawn, tmp_path, port, "mlflow-1")
    cfg = replace(TINY_TRAIN, max_steps=60, ckpt_every=5, eval_every=5, log_every=2)
    out = tmp_path / "run"
    args = {"prep": str(make_prep(tmp_path / "prep")), "out": str(out), "sleep": 0.25, "cfg": asdict(cfg)}
    env = {**_base_env(tmp_path), "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    child = spawn([sys.executable, "-c", OUTAGE_CHILD, json.dumps(args)], env, "train")
    c = MlflowClient(uri)
    _wait_for(lambda: (out / "train.json").exists() and json.loads((out / "train.json").read_text())
              .get("checkpoint_step", 0) >= 5, "the first checkpoint", child, timeout=180)
    run_id = json.loads((out / "train.json").read_text())["run_id"]
    stop(server)  # down: every request fails after one retry
    down_at = json.loads((out / "train.json").read_text())["checkpoint_step"]
    _wait_for(lambda: "does not answer" in child.tail(20000), "the warning", child, timeout=60)
    # the training goes on through checkpoints while MLflow is away
    _wait_for(lambda: json.loads((out / "train.json").read_text())["checkpoint_step"] >= down_at + 10,
              "two checkpoints during the outage", child, timeout=120)
    assert (out / tracking.SPOOL).is_file()
    _mlflow_server(spawn, tmp_path, port, "mlflow-2")
    assert child.popen.wait(timeout=240) == 0, child.tail()
    log = child.tail(50000)
    assert log.count("does not answer") == 1 and "answers again" in log, log[-3000:]
    assert not (out / tracking.SPOOL).exists()
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    n = cfg.max_steps
    expected = {"train/loss": range(1, n + 1), "val/loss": range(5, n + 1, 5), "perf/mfu": range(2, n + 1, 2)}
    for key, steps in expected.items():
        got = [m.step for m in c.get_metric_history(run_id, key)]
        assert sorted(got) == list(steps), (key, sorted(got))


# ---------------------------------------------------------------------------------------------------- GPU slot
SLOT_FLOW = """
import pathlib, sys, time
from prefect import flow, runtime, task
from flows.deploy import TRAIN_TAG, train_slot_watch
name, go = sys.argv[1], pathlib.Path(sys.argv[2])

@task(tags=[TRAIN_TAG], task_run_name="train-{who}")
def train(who):
    print(f"{who} holds the slot", flush=True)
    while not go.exists():
        time.sleep(0.2)

@flow(name="slot-" + name)
def pipeline():
    with train_slot_watch(runtime.flow_run.id, every_s=1.0):
        train(name)

pipeline()
print(name, "done", flush=True)
"""


def _prefect_server(spawn, tmp: Path, port: int, name: str) -> Proc:
    env = {**_base_env(tmp), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db",
           "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}  # a freed slot is found sooner
    proc = spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                 env, name)
    _wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), "the Prefect server", proc, every=0.3)
    return proc


@pytest.mark.servers
def test_a_prefect_restart_while_a_training_holds_the_slot_does_not_leak_it(tmp_path, spawn):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = _prefect_server(spawn, tmp_path, port, "prefect-1")
    env = {**_base_env(tmp_path), "PREFECT_API_URL": url, "PREFECT_LOGGING_LEVEL": "INFO"}
    with temporary_settings({PREFECT_API_URL: url}):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            assert deploy_lib.ensure_gpu_limit(client, 1) == 1

            def slots():
                return deploy_lib.train_slots(client)

            a = spawn([sys.executable, "-c", SLOT_FLOW, "A", str(tmp_path / "go-A")], env, "flow-A")
            _wait_for(lambda: "A holds the slot" in a.tail(), "A to take the slot", a, every=0.3)
            _wait_for(lambda: (s := slots()) and s.active == 1 and s.holders, "A on record as the holder", a,
                      every=0.5)
            stop(server)
            server = _prefect_server(spawn, tmp_path, port, "prefect-2")
            leased = client.read_concurrency_limit_by_tag(deploy_lib.TRAIN_TAG).active_slots
            assert slots().active == 1 and leased == []  # the restart forgot A's lease but kept the count

            (tmp_path / "go-B").touch()  # B, once it has the slot, finishes at once
            b = spawn([sys.executable, "-c", SLOT_FLOW, "B", str(tmp_path / "go-B")], env, "flow-B")
            _wait_for(lambda: "waits for a GPU slot" in b.tail(), "B to say what it waits for", b, timeout=90,
                      every=0.3)
            assert "task run 'train-A'" in b.tail() and "B holds the slot" not in b.tail()  # A still runs: B waits

            (tmp_path / "go-A").touch()  # A ends; its release finds no lease, so the slot would stay taken
            assert a.popen.wait(timeout=90) == 0, a.tail()
            assert b.popen.wait(timeout=90) == 0, b.tail()
            assert "gave back 1 slot(s)" in b.tail() and "B holds the slot" in b.tail(), b.tail()
            _wait_for(lambda: slots().active == 0, "the slot to be free after B", timeout=30, every=0.5)
