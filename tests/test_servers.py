"""Real servers on loopback (CI has no Docker engine, so the programs run directly).

A Prefect server (SQLite, API auth on) and an MLflow tracking server (SQLite, artifacts proxied to a local folder)
start on free 127.0.0.1 ports; `tessera deploy` registers deploy/prefect.yaml, `tessera worker` runs a retrain of one
model on a tiny config through `prefect deployment run`, and the run lands in MLflow (runs, metrics, artifacts,
registered model) with its training slot taken from the GPU concurrency limit. Every process a test starts is
stopped by its fixture, also when the test fails. The static checks of deploy/ at the end need no server.

Skip the server tests with -m "not servers" (add "and not slow" to keep the slow ones out too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from flows import deploy as deploy_lib
from flows.cli import main as cli_main
from tests.processes import BIN, ROOT, Proc, free_port, http_ok, start, stop, wait_for

AUTH = "tessera:loopback-secret"
EXPERIMENT = "tessera-loopback"
STARTUP_S = 300  # both servers start side by side; a busy 2-core machine needs a minute or more
RUN_S = 480


def _wait_http(url: str, proc: Proc, deadline: float) -> None:
    wait_for(lambda: http_ok(url, timeout=5), url, proc, timeout=deadline - time.monotonic(), every=1)


@dataclass
class Servers:
    prefect_url: str
    mlflow_url: str
    artifacts: Path
    env: dict  # environment for clients of both servers: tessera deploy, workers, prefect CLI


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("servers")
    home = tmp / "prefect-home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    p_port, m_port = free_port(), free_port()
    started: list[Proc] = []
    try:  # both start side by side; whatever started is stopped, whatever fails
        started.append(prefect := start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p_port), "--no-ui"],
            {**base, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}/prefect.db",
             "PREFECT_SERVER_API_AUTH_STRING": AUTH}, tmp / "prefect-server.log"))
        started.append(mlflow := start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(m_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination", str(tmp / "mlartifacts")],
            {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp / "mlflow-server.log", cwd=tmp))
        deadline = time.monotonic() + STARTUP_S
        _wait_http(f"http://127.0.0.1:{p_port}/api/health", prefect, deadline)
        _wait_http(f"http://127.0.0.1:{m_port}/health", mlflow, deadline)
        env = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{p_port}/api", "PREFECT_API_AUTH_STRING": AUTH,
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{m_port}"}
        yield Servers(env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"], tmp / "mlartifacts", env)
    finally:
        for proc in started:
            stop(proc)
    assert all(proc.popen.poll() is not None for proc in started)


@contextmanager
def _api(url: str, auth: str | None = AUTH):
    """An in-process Prefect client of the loopback server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def deployed(servers):
    done = subprocess.run([str(BIN / "tessera"), "deploy"], env=servers.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def worker(servers, deployed, tmp_path_factory):
    proc = start([str(BIN / "tessera"), "worker", "--name", "loopback"], servers.env,
                  tmp_path_factory.mktemp("worker") / "worker.log")
    yield proc
    stop(proc)


@pytest.mark.servers
def test_deploy_registers_deployments_pool_and_gpu_limit(servers, deployed):
    assert "pipeline/full, data/refresh, pipeline/retrain" in deployed.stdout
    specs = {d["name"]: d for d in yaml.safe_load(deploy_lib.PREFECT_FILE.read_text())["deployments"]}
    with _api(servers.prefect_url) as client:
        pool = client.read_work_pool("tessera")
        assert pool.type == "process"
        for name in ("pipeline/full", "data/refresh", "pipeline/retrain"):
            dep = client.read_deployment_by_name(name)
            assert dep.work_pool_name == "tessera" and dep.parameters == specs[dep.name]["parameters"]
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                       {"directory": "{{ $TESSERA_PROJECT_DIR }}"}}]
            assert [s.schedule.cron for s in dep.schedules] == [specs[dep.name]["schedules"][0]["cron"]]
            assert not any(s.active for s in dep.schedules), f"{name}: schedules must be off by default"
        limit = client.read_concurrency_limit_by_tag(deploy_lib.TRAIN_TAG)
        assert limit.concurrency_limit == 1
        (zombies,) = client.read_automations_by_name(deploy_lib.ZOMBIE_AUTOMATION)  # flow runs of a dead machine
        assert zombies.enabled and zombies.trigger.posture == "Proactive" and "prefect.flow-run.heartbeat" in \
            zombies.trigger.after and zombies.actions[0].state == "CRASHED"
        assert deploy_lib.ensure_zombie_automation(client) is False  # once per server
    # a second deploy changes nothing it should not: the pool exists, the limit keeps its value unless asked
    with _api(servers.prefect_url) as client:
        assert deploy_lib.ensure_pool(client, "tessera") is False
        assert deploy_lib.ensure_gpu_limit(client) == 1
        assert deploy_lib.ensure_gpu_limit(client, 2) == 2
        assert deploy_lib.ensure_gpu_limit(client, 1) == 1


@pytest.mark.servers
def test_deploy_errors_name_the_value_and_the_fix(servers, capsys):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: servers.prefect_url, PREFECT_API_AUTH_STRING: "tessera:wrong"}):
        assert cli_main(["deploy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused the credentials" in err and "PREFECT_API_AUTH_STRING" in err, err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli_main(["deploy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "PREFECT_API_URL is not set" in err, err
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert cli_main(["deploy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not answer" in err, err


def _tiny_retrain(root: Path) -> dict:
    return {"params": {
        "data": {"root": str(root), "size": 16, "n_mels": 32, "n_frames": 64, "shard_maxcount": 32},
        "codebooks": {"pixels_k": 16, "image_k": 32},
        "train": {"models": ["vit"], "preset": "tiny", "steps": 6, "batch_size": 8, "device": "cpu"},
        "eval": {"max_samples": 16},
        "experiment": EXPERIMENT,
    }}


def _task_runs(client, flow_run_id, wait_s: float = 120) -> dict:
    """task run name -> task run, once none is Pending/Running (Prefect 3 reports task states in the background)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + wait_s
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        named = {r.name: r for r in runs}
        if not {"Pending", "Running"} & {r.state_name for r in runs} or time.monotonic() > deadline:
            return named
        time.sleep(1)


def _limit_events(servers: Servers, task_run_id, wait_s: float = 60) -> set[str]:
    """Names of the concurrency-limit events (acquired/released) that name task run `task_run_id`."""
    body = {"filter": {"event": {"prefix": ["prefect.concurrency-limit."]},
                       "any_resource": {"id": [f"prefect.task-run.{task_run_id}"]}}, "limit": 50}
    user, password = AUTH.split(":", 1)
    deadline = time.monotonic() + wait_s
    while True:
        res = httpx.post(f"{servers.prefect_url}/events/filter", json=body, auth=(user, password), timeout=30)
        res.raise_for_status()
        events = [e for e in res.json()["events"] if e["resource"].get("prefect.resource.name") == f"tag:{deploy_lib.TRAIN_TAG}"]
        names = {e["event"] for e in events}
        if len(names) >= 2 or time.monotonic() > deadline:
            return names
        time.sleep(1)


@pytest.mark.servers
def test_retrain_deployment_runs_on_a_worker_and_lands_in_the_mlflow_server(servers, worker, tmp_path):
    from mlflow import MlflowClient

    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "pipeline/retrain", "--params", json.dumps(_tiny_retrain(tmp_path / "out")),
         "--watch", "--watch-interval", "2", "--watch-timeout", str(RUN_S)],
        env=servers.env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_S + 60)
    found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    flow_run_id = found.group(1)
    with _api(servers.prefect_url) as client:
        state = client.read_flow_run(flow_run_id).state
        assert done.returncode == 0 and state.is_completed(), f"{state}\n{done.stdout[-1500:]}\nworker:\n{worker.tail()}"
        tasks = _task_runs(client, flow_run_id)
        assert tasks["train-vit"].state_name == "Completed" and deploy_lib.TRAIN_TAG in tasks["train-vit"].tags
        # the training took its slot from the GPU limit and gave it back
        assert _limit_events(servers, tasks["train-vit"].id) == {"prefect.concurrency-limit.acquired",
                                                                  "prefect.concurrency-limit.released"}
        assert client.read_concurrency_limit_by_tag(deploy_lib.TRAIN_TAG).active_slots == []

    mlflow = MlflowClient(servers.mlflow_url)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("prefect.flow_run_id") == flow_run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    train = children["train-vit"]
    assert train.info.status == "FINISHED" and "codebooks" in children
    loss_keys = [k for k in train.data.metrics if "loss" in k]
    assert loss_keys and any(k.startswith("test/") for k in train.data.metrics), train.data.metrics
    history = mlflow.get_metric_history(train.info.run_id, loss_keys[0])
    assert history and all(m.step >= 0 for m in history)
    assert {"checkpoint", "test"} <= {a.path for a in mlflow.list_artifacts(train.info.run_id)}
    assert mlflow.list_artifacts(train.info.run_id, "checkpoint")
    assert any(p.is_file() for p in servers.artifacts.rglob("*")), "the server stored no artifact under its root"
    versions = mlflow.search_model_versions("name='tessera-builtin-vit'")  # tessera-<dataset>-<model>
    assert versions and versions[0].run_id == train.info.run_id
    assert parents[0].inputs.dataset_inputs  # dataset lineage


# --- static checks of deploy/ (no server) ---


def test_train_task_carries_the_gpu_tag():
    from tasks.stages import train_model

    assert deploy_lib.TRAIN_TAG in train_model.tags


def test_torchrun_ranks_do_not_queue_for_the_gpu_slot():
    """Under torchrun every rank runs the train task; one slot taken by rank 0 would leave rank 1 waiting for it
    while rank 0 waits for rank 1 in the first all-reduce (seen with a limit of 1 before ranks were exempted)."""
    code = "from tasks.stages import train_model; print('tags', sorted(train_model.tags))"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "tags []" in done.stdout, done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("name", ["prefect.yaml", "prefect.docker.yaml", "prefect.k8s.yaml"])
def test_deployment_files(name):
    import importlib

    from prefect import Flow

    from flows.params import DataParams, PipelineParams

    spec = yaml.safe_load((ROOT / "deploy" / name).read_text())
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"full", "refresh", "retrain"}
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert isinstance(flow, Flow)
        (PipelineParams if flow.name == "pipeline" else DataParams)(**d["parameters"]["params"])  # validates
        assert d["work_pool"]["name"]
        assert [s["active"] for s in d["schedules"]] == [False] and d["schedules"][0]["cron"]
    assert deployments["retrain"]["parameters"]["params"]["train"]["models"] == ["vit"]


def test_kubernetes_pool_template_asks_for_gpus():
    # the shape of prefect-kubernetes' default base job template (only the parts the patch touches)
    default = {"variables": {"type": "object", "properties": {"image": {"type": "string"}}},
               "job_configuration": {"job_manifest": {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {
                   "spec": {"containers": [{"name": "prefect-job", "image": "{{ image }}", "env": "{{ env }}"}]}}}}}}
    patched = deploy_lib.kubernetes_gpu_template(default, gpus=2)
    container = patched["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["envFrom"] == [{"secretRef": {"name": deploy_lib.SECRET, "optional": True}}]
    assert patched["variables"]["properties"]["gpus"]["default"] == 2
    assert "resources" not in default["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_worker_command_runs_flows_from_this_checkout(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("TESSERA_PROJECT_DIR", raising=False)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        argv, env = deploy_lib.worker_command("tessera", limit=1)
    assert argv[1:] == ["-m", "prefect", "worker", "start", "--pool", "tessera", "--type", "process", "--limit", "1"]
    assert env["TESSERA_PROJECT_DIR"] == str(ROOT) and env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30  # heartbeats for the zombie automation (Prefect: >= 30)
    assert cli_main(["worker", "--limit", "0"]) == 2


def test_compose_binds_to_loopback_with_auth_and_no_committed_secrets():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
        env = svc.get("environment") or {}
        pairs = dict(e.split("=", 1) if "=" in e else (e, None) for e in env) if isinstance(env, list) else env
        for key, value in pairs.items():
            if re.search("PASSWORD|SECRET|AUTH_STRING", key) and value is not None:
                assert value.startswith("${"), f"{name}: {key} must come from deploy/.env, not the file"
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert "--app-name=basic-auth" in services["mlflow"]["command"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11" in dockerfile and "pip install --no-deps -e ." in dockerfile
    example = (ROOT / "deploy" / ".env.example").read_text()
    for key in ("POSTGRES_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"):
        assert f"\n{key}=" in example
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored or "/deploy/.env" in ignored
