"""`tessera deploy` and `tessera worker`: the deployments of deploy/prefect.yaml on a Prefect server, and workers.

deploy: checks that PREFECT_API_URL names a running server that accepts our credentials, creates the work pool if it
is missing, creates the GPU concurrency limit (the tag of the train task, one slot per GPU the pool may use), then
registers the deployments with Prefect's own `prefect deploy` (deploy/prefect.yaml stays the one description).
worker: starts `prefect worker start` for the pool, with TESSERA_PROJECT_DIR set to this checkout (the
deployments' pull step changes into it, so flow runs find the code and write `outputs/` there).

GPU slots: the train task takes a slot of the limit `tag:tessera-train` with a 60 s lease that Prefect renews while
the task runs, so the slot of a holder that dies comes back when its lease runs out (the server's repossessor looks
every 15 s). A server that keeps its leases in memory (Prefect's default) forgets them when it restarts but keeps the
count: the holder's release then finds no lease and the slot stays taken for good, and every later training waits
in Pending without a word. `repair_train_slots` gives back the slots that no holder accounts for (a lease, or a
training still running under an unfinished flow run); `train_slot_watch`, around the pipeline's body, runs it while
a training of the flow run waits and says in the flow run's log what the training waits for. A server started with
PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem keeps its leases across
a restart, so the repair is rarely needed there.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from tasks.infra import procs

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_DIR / "deploy" / "prefect.yaml"
# The tag on the train task (tasks/stages.py): Prefect lets at most `limit` task runs with this tag run at once,
# across every worker and every flow run that reports to the same server.
TRAIN_TAG = "tessera-train"
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


# ---------------------------------------------------------------------------------------------------- GPU slots
@dataclass
class SlotState:
    """The GPU limit as the server has it: `active` of `limit` slots taken, and the task runs that account for them."""

    limit: int
    active: int
    holders: list[Any]  # task runs (or bare ids): a lease, or Running under a flow run that has not finished


def train_slots(client) -> SlotState | None:
    """The `tag:tessera-train` limit and its holders; None when the server has no such limit."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType, TaskRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    try:
        limit = client.read_global_concurrency_limit_by_name(f"tag:{TRAIN_TAG}")
        leased = client.read_concurrency_limit_by_tag(TRAIN_TAG).active_slots  # task runs with a lease
    except ObjectNotFound:
        return None
    running = client.read_task_runs(task_run_filter=TaskRunFilter(
        tags=TaskRunFilterTags(all_=[TRAIN_TAG]), state=TaskRunFilterState(type=TaskRunFilterStateType(
            any_=[StateType.RUNNING]))))
    flow_ids = list({r.flow_run_id for r in running if r.flow_run_id})
    flows = {f.id: f for f in client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_ids)))} if flow_ids else {}
    holders = {r.id: r for r in running
               if r.flow_run_id in flows and flows[r.flow_run_id].state and not flows[r.flow_run_id].state.is_final()}
    for task_run_id in leased:
        if task_run_id not in holders:
            try:
                holders[task_run_id] = client.read_task_run(task_run_id)
            except ObjectNotFound:
                holders[task_run_id] = task_run_id
    return SlotState(limit.limit, limit.active_slots, list(holders.values()))


def repair_train_slots(client, confirm_s: float = 1.0) -> int:
    """Give back the slots of `tag:tessera-train` that no holder accounts for (see the module docstring); the
    number given back. It looks twice, `confirm_s` apart: a slot is counted a moment before its lease is written."""
    state = train_slots(client)
    if state is None or state.active <= len(state.holders):
        return 0
    time.sleep(confirm_s)
    state = train_slots(client)
    if state is None or state.active <= len(state.holders):
        return 0
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    client.update_global_concurrency_limit(f"tag:{TRAIN_TAG}",
                                           GlobalConcurrencyLimitUpdate(active_slots=len(state.holders)))
    return state.active - len(state.holders)


OWNER_PREFIX = "tessera.owner="  # a flow-run tag: the process that runs it (tasks/infra/procs.py `owner`)


def claim_flow_run(client, flow_run_id) -> None:
    """Tag flow run `flow_run_id` with the process that runs it, so a later start can tell that it died."""
    run = client.read_flow_run(flow_run_id)
    mine = OWNER_PREFIX + procs.owner()
    if mine not in run.tags:
        client.update_flow_run(flow_run_id, tags=[t for t in run.tags if not t.startswith(OWNER_PREFIX)] + [mine])


def crash_orphaned_runs(client) -> list[str]:
    """Flow runs still Running whose owner process on this host is gone (SIGKILL, power loss): Crashed, with their
    Running task runs, so the UI shows what happened and the GPU slots their trainings held count as free
    (`repair_train_slots`). Returns the names of the flow runs it ended. Runs owned on other hosts are left alone."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
                                                FlowRunFilterStateType, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
    ended = []
    for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=running)):
        owner = next((t.removeprefix(OWNER_PREFIX) for t in run.tags if t.startswith(OWNER_PREFIX)), None)
        if owner is None or procs.alive(owner) is not False:
            continue
        why = f"its process ({owner}) is gone; ended by the next start (tessera)"
        for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING])))):
            client.set_task_run_state(task_run.id, Crashed(message=why), force=True)
        client.set_flow_run_state(run.id, Crashed(message=why), force=True)
        ended.append(run.name)
    return ended


def start_flow_run(flow_run_id) -> None:
    """At the start of a flow's body: tag the run with its owner and end the runs of dead owners (one line each in
    the log). Never fails the flow: without an API there is nothing to tidy."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            claim_flow_run(client, flow_run_id)
            for name in crash_orphaned_runs(client):
                _logger().warning(f"flow run {name!r} was left Running by a process that is gone: marked Crashed")
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never break the flow
        logging.getLogger("tessera").debug("flow-run bookkeeping: %s", exc)


def describe_holder(client, holder) -> str:
    """One holder for the log: task run 'train-x' of flow run 'calm-otter' (Running), Running since 12:01:02 UTC."""
    if not hasattr(holder, "flow_run_id"):
        return f"task run {holder} (no longer on the server)"
    flow = client.read_flow_run(holder.flow_run_id) if holder.flow_run_id else None
    since = holder.start_time.strftime("%H:%M:%S UTC") if holder.start_time else "?"
    where = f" of flow run {flow.name!r} ({flow.state_name})" if flow else ""
    return f"task run {holder.name!r}{where}, {holder.state_name} since {since}"


def _waiting(client, flow_run_id) -> list[Any]:
    """The task runs of `flow_run_id` with the GPU tag that are Pending: waiting for a slot."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType, TaskRunFilterTags)
    from prefect.client.schemas.objects import StateType

    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[TRAIN_TAG]), state=TaskRunFilterState(
            type=TaskRunFilterStateType(any_=[StateType.PENDING]))))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run
        return logging.getLogger("tessera")


def _watch_slots(flow_run_id, stop: threading.Event, every_s: float) -> None:
    """The body of train_slot_watch's thread."""
    from prefect.client.orchestration import get_client

    told: tuple | None = None
    with get_client(sync_client=True) as client:
        if train_slots(client) is None:
            return  # no GPU limit on this server (a temporary one): nothing ever waits
        while not stop.wait(every_s):
            try:
                waiting = _waiting(client, flow_run_id)
                state = train_slots(client) if waiting else None
                if state is None or state.active < state.limit:
                    continue
                if freed := repair_train_slots(client):
                    _logger().warning(f"gave back {freed} slot(s) of the GPU limit tag:{TRAIN_TAG} that no running "
                                      "training held (the Prefect server restarted and forgot who held them)")
                    continue
                key = tuple(sorted(str(getattr(h, "id", h)) for h in state.holders))
                if key != told:
                    told = key
                    held = "; ".join(describe_holder(client, h) for h in state.holders) or "no task run on record"
                    _logger().warning(
                        f"{', '.join(repr(w.name) for w in waiting)} waits for a GPU slot: the concurrency limit "
                        f"tag:{TRAIN_TAG} has {state.active} of {state.limit} taken, by {held}. It starts when one "
                        "is given back; a holder whose process is gone gives it back when its lease runs out (about "
                        f"a minute). See: prefect gcl inspect tag:{TRAIN_TAG}")
            except Exception as exc:  # noqa: BLE001 - a watch must never break the flow it watches
                logging.getLogger("tessera").debug("slot watch: %s", exc)


@contextlib.contextmanager
def train_slot_watch(flow_run_id, every_s: float = 5.0) -> Iterator[None]:
    """While the body runs, a thread looks every `every_s` seconds whether a training of flow run `flow_run_id`
    waits for a GPU slot; if so it gives back slots that no holder accounts for (repair_train_slots) and says in the
    flow run's log what holds them. Nothing happens on a server without the limit."""
    stop = threading.Event()
    context = contextvars.copy_context()  # the flow run's context: its logger and its Prefect client settings
    thread = threading.Thread(target=context.run, args=(_watch_slots_quietly, flow_run_id, stop, every_s),
                              name="tessera-slot-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _watch_slots_quietly(flow_run_id, stop: threading.Event, every_s: float) -> None:
    try:
        _watch_slots(flow_run_id, stop, every_s)
    except Exception as exc:  # noqa: BLE001 - no API, no limit: no watch
        logging.getLogger("tessera").debug("slot watch ended: %s", exc)


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
