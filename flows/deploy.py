"""`tessera deploy` and `tessera worker`: the deployments of deploy/prefect.yaml on a Prefect server, and workers.

deploy: checks that PREFECT_API_URL names a running server that accepts our credentials, creates the work pool if it
is missing, creates the GPU concurrency limit (the tag of the train task, one slot per GPU the pool may use), then
registers the deployments with Prefect's own `prefect deploy` (deploy/prefect.yaml stays the one description).
worker: starts `prefect worker start` for the pool, with TESSERA_PROJECT_DIR set to this checkout (the
deployments' pull step changes into it, so flow runs find the code and write `outputs/` there).

runs.py keeps the server's record of running flow runs true (their owners; the GPU slots of the train task's tag,
whose limit `ensure_gpu_limit` creates); its names stay importable from here.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from flows.runs import (  # noqa: F401 (re-exported: flows.deploy was their home)
    OWNER_PREFIX,
    TRAIN_TAG,
    SlotState,
    claim_flow_run,
    crash_orphaned_runs,
    describe_holder,
    repair_train_slots,
    start_flow_run,
    train_slot_watch,
    train_slots,
)
from tasks.infra import procs

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_DIR / "deploy" / "prefect.yaml"
POOL_TYPES = ("process", "docker", "kubernetes")
SECRET = "tessera-secrets"  # kubernetes pools: the Secret whose keys become the flow-run pod's environment


def api_url() -> str:
    """The Prefect API this process talks to; deployments on a throw-away ephemeral API would vanish, so one is required."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ValueError("PREFECT_API_URL is not set; start a server (prefect server start, or deploy/compose.yaml) "
                         "and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def check_api(client, url: str) -> None:
    """One-line errors for the two usual mistakes: no server at the URL, and credentials the server refuses."""
    import httpx

    if (err := client.api_healthcheck()) is not None:
        raise ValueError(f"PREFECT_API_URL={url} does not answer ({type(err).__name__}); start the server or fix the URL")
    try:
        client.api_version()  # unlike /health, this one needs the credentials
    except httpx.HTTPStatusError as err:
        if err.response.status_code == 401:
            raise ValueError(f"the Prefect API at {url} refused the credentials (401); set PREFECT_API_AUTH_STRING "
                             "to the server's PREFECT_SERVER_API_AUTH_STRING (user:password)") from None
        raise


def read_deployments(prefect_file: Path) -> list[dict]:
    if not prefect_file.is_file():
        raise ValueError(f"deployment file {prefect_file} does not exist; pass --prefect-file PATH to a prefect.yaml")
    spec = yaml.safe_load(prefect_file.read_text()) or {}
    deployments = spec.get("deployments") or []
    if not deployments:
        raise ValueError(f"{prefect_file} lists no deployments; add them under `deployments:`")
    return deployments


def kubernetes_gpu_template(template: dict, gpus: int = 1, secret: str = SECRET) -> dict:
    """Prefect's default kubernetes pool template, with a job container that asks for `{{ gpus }}` NVIDIA GPUs (job
    variable `gpus`, default `gpus`; 0 for none) and takes its environment from Secret `secret` when that exists."""
    template = copy.deepcopy(template)
    template["variables"]["properties"]["gpus"] = {
        "title": "GPUs", "type": "integer", "default": gpus, "minimum": 0,
        "description": "NVIDIA GPUs for the flow-run pod (resources.limits nvidia.com/gpu)"}
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpus }}"
    container.setdefault("envFrom", []).append({"secretRef": {"name": secret, "optional": True}})
    return template


def ensure_pool(client, name: str, pool_type: str = "process") -> bool:
    """Create work pool `name` of `pool_type` with that type's default template; False when it already exists."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.base import BaseWorker

    if pool_type not in POOL_TYPES:
        raise ValueError(f"--pool-type={pool_type!r} is not one of {list(POOL_TYPES)}")
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        pool = None
    if pool is not None:
        if pool.type != pool_type:
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}; "
                             f"pass --pool-type {pool.type}, or --pool NAME for another pool")
        return False
    worker_cls = BaseWorker.get_worker_class_from_type(pool_type)
    if worker_cls is None:
        package = f"prefect-{pool_type}"
        raise ValueError(f"--pool-type={pool_type!r} needs the {package} package here (pip install {package}), or create "
                         f"the pool yourself: prefect work-pool create {name} --type {pool_type}")
    template = worker_cls.get_default_base_job_template()
    if pool_type == "kubernetes":
        template = kubernetes_gpu_template(template)
    try:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
    except ObjectAlreadyExists:  # created by a worker or a second `tessera deploy` meanwhile
        return False
    return True


def ensure_gpu_limit(client, slots: int | None = None) -> int:
    """The task concurrency limit on TRAIN_TAG: created with `slots` (default 1), changed only when `slots` is given."""
    from prefect.exceptions import ObjectNotFound

    if slots is not None and slots < 1:
        raise ValueError(f"--gpu-slots={slots}: give at least 1 (the number of GPUs the pool's workers share)")
    try:
        current = client.read_concurrency_limit_by_tag(TRAIN_TAG).concurrency_limit
    except ObjectNotFound:
        current = None
    if current is None or (slots is not None and slots != current):
        current = slots or 1
        client.create_concurrency_limit(tag=TRAIN_TAG, concurrency_limit=current)
    repair_train_slots(client)
    return current


@dataclass
class DeployResult:
    api_url: str
    deployments: list[str]
    pools: dict[str, bool]  # pool -> created now
    gpu_slots: int


def deploy(prefect_file: Path = PREFECT_FILE, names: list[str] | None = None, pool: str | None = None,
           pool_type: str = "process", gpu_slots: int | None = None) -> DeployResult:
    """Register the deployments of `prefect_file` (all, or `names`) against the Prefect API in use."""
    from prefect.client.orchestration import get_client

    prefect_file = Path(prefect_file).resolve()
    specs = read_deployments(prefect_file)
    if names:
        known = {d["name"] for d in specs}
        if unknown := [n for n in names if n.split("/")[-1] not in known]:
            raise ValueError(f"--name {unknown}: no such deployment in {prefect_file}; choose from {sorted(known)}")
        specs = [d for d in specs if d["name"] in {n.split("/")[-1] for n in names}]
    url = api_url()
    pools = [pool] if pool else sorted({(d.get("work_pool") or {}).get("name") for d in specs} - {None})
    if not pools:
        raise ValueError(f"{prefect_file}: the deployments name no work pool; add work_pool.name or pass --pool NAME")
    with get_client(sync_client=True) as client:
        check_api(client, url)
        created = {p: ensure_pool(client, p, pool_type) for p in pools}
        slots = ensure_gpu_limit(client, gpu_slots)
        ensure_zombie_automation(client)
    cmd = [sys.executable, "-m", "prefect", "deploy", "--no-prompt", "--prefect-file", str(prefect_file)]
    cmd += [a for d in specs for a in ("--name", d["name"])] if names else ["--all"]
    cmd += ["--pool", pool] if pool else []
    # entrypoints in prefect.yaml are relative to the project root
    # under procs' watchdog: a `tessera deploy` that is killed takes `prefect deploy` with it
    done = subprocess.run(procs.guarded_argv(cmd), cwd=PROJECT_DIR, env={**os.environ, "PREFECT_API_URL": url})
    if done.returncode != 0:
        raise ValueError(f"`prefect deploy` failed (exit {done.returncode}, its output is above); fix {prefect_file} "
                         "or the Prefect server it names")
    with get_client(sync_client=True) as client:
        return DeployResult(url, [registered_name(client, d) for d in specs], created, slots)


ZOMBIE_AUTOMATION = "tessera: crash flow runs whose heartbeat stopped"
HEARTBEAT_S = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the flow runs a `tessera worker` starts
ZOMBIE_S = 5 * HEARTBEAT_S  # no heartbeat for this long: the flow run's machine or process is gone


def ensure_zombie_automation(client) -> bool:
    """Prefect's own answer to a flow run whose machine died (any host): the worker's flow runs send a heartbeat
    event every HEARTBEAT_S, and this automation marks a Running flow run Crashed when ZOMBIE_S pass without one or
    an end (docs: "detect zombie flows"). Created once per server; True when created now."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if client.read_automations_by_name(ZOMBIE_AUTOMATION):
        return False
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    trigger = EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
                           match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                           for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                           within=timedelta(seconds=ZOMBIE_S))
    action = ChangeFlowRunState(state=StateType.CRASHED, force=True,
                                message=f"no heartbeat for {ZOMBIE_S} s: its machine or process is gone")
    client.create_automation(AutomationCore(name=ZOMBIE_AUTOMATION, trigger=trigger, actions=[action],
                                            description="tessera deploy: flow runs of a dead worker end Crashed"))
    return True


def registered_name(client, spec: dict) -> str:
    """FLOW/DEPLOYMENT of a deployment of prefect.yaml as the server now has it (what `prefect deployment run` takes)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[spec["name"]])))
    for dep in found:
        if dep.entrypoint == spec["entrypoint"]:
            return f"{client.read_flow(dep.flow_id).name}/{dep.name}"
    raise ValueError(f"deployment {spec['name']!r} is not on the server after `prefect deploy`; "
                     "check the Prefect server log")


def worker_command(pool: str = "tessera", name: str | None = None, limit: int | None = None) -> tuple[list[str], dict]:
    """argv and environment of a process worker for `pool` that runs flow runs from this checkout."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit}: give at least 1 (flow runs this worker runs at once)")
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    argv += ["--name", name] if name else []
    argv += ["--limit", str(limit)] if limit else []
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    env.setdefault("TESSERA_PROJECT_DIR", str(PROJECT_DIR))
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))  # for ensure_zombie_automation
    return argv, env
