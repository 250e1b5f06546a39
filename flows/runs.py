"""Flow runs on the Prefect server while they run: which process owns each (the runs of owners that are gone end
Crashed) and the GPU slots of the train task's tag (slots no holder accounts for are given back; a waiting training
says in its flow run's log what it waits for). deploy.py sets the server up; this keeps its record of running flow
runs true.

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
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from tasks.infra import procs

# The tag on the train task (tasks/stages.py): Prefect lets at most `limit` task runs with this tag run at once,
# across every worker and every flow run that reports to the same server.
TRAIN_TAG = "tessera-train"


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
