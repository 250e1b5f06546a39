"""Orchestration and tracking: what Prefect and MLflow add to the work they orchestrate and record.

    prefect_overhead   the `pipeline` flow (flows/pipeline.py) on a small built-in set (tests/test_pipeline.py's
                       sizes, three models) under Prefect vs the same flow bodies with every task and subflow called
                       as its plain function (`.fn`) and Prefect's artifact calls skipped: wall clock, and the
                       difference per task run in ms
    cached_rerun       the same flow again over the first run's output root (every task Cached) vs the first run
    mlflow_logging     tasks.train.trainer.train (ViT, default size, batch 64, on 400 built-in images): time inside the metric
                       logging calls (buffer `add` every step, one `log_batch` per `log_every` steps) as a share of
                       the training loop's time

Prefect and MLflow state lives in a temp folder (PREFECT_HOME, a SQLite MLflow store): the measurement runs in a
child process (`python -m benchmarks.orchestration OUT.json WORK`) so that its settings are read before Prefect is
imported, and the temporary Prefect API server it starts ends with it. The API server starts before any timed run;
its start-up is reported, not counted. A warm-up run (plain calls) comes first, then Prefect and plain runs
alternate, each over its own new output root (so nothing is reused between them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks.common import Row, check, median

TARGETS = {"prefect": "<= 1.05", "cached": "<= 0.05", "mlflow": "<= 0.03"}
MODELS = ["vit", "imagegpt", "clip"]  # a classifier, a codebook model, CLIP (and so the index)


def _flow(root: Path, quick: bool):
    """(flow, its parameters): the whole pipeline on a small set; quick: the data flow alone on a tiny one."""
    from flows.params import CodebookParams, DataParams, EvalParams, PipelineParams, TrainParams

    if quick:
        from flows.data import data_flow

        return data_flow, DataParams(root=root, size=16, n_mels=32, n_frames=64, shard_maxcount=8)
    from flows.pipeline import pipeline

    return pipeline, PipelineParams(  # tests/test_pipeline.py's sizes, three models: every kind of stage runs
        data=DataParams(root=root, size=72, n_mels=32, n_frames=64, shard_maxcount=32),
        codebooks=CodebookParams(pixels_k=16, image_k=32),
        train=TrainParams(models=MODELS, preset="tiny", steps=6, batch_size=8),
        eval=EvalParams(max_samples=16))


def run_flow(root: Path, quick: bool, **kwargs):
    flow, params = _flow(root, quick)
    return flow(params, **kwargs)


@contextlib.contextmanager
def plain_calls(counts: dict[str, int]):
    """Tasks and flows called as their plain functions (counted); Prefect's artifact calls skipped."""
    from prefect import Flow, Task

    import flows.data
    import flows.pipeline

    def task_call(self, *args, **kwargs):
        counts["tasks"] = counts.get("tasks", 0) + 1
        return self.fn(*args, **kwargs)

    def flow_call(self, *args, **kwargs):
        counts["flows"] = counts.get("flows", 0) + 1
        return self.fn(*args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(Task, "__call__", task_call))
        stack.enter_context(mock.patch.object(Flow, "__call__", flow_call))
        for module in (flows.data, flows.pipeline):
            if hasattr(module, "create_markdown_artifact"):
                stack.enter_context(mock.patch.object(module, "create_markdown_artifact", lambda *a, **k: None))
        yield


@contextlib.contextmanager
def timed(owner, names: tuple[str, ...], events: list[tuple[str, float, float]]):
    """Record (name, start, seconds) of every call to owner.<name> while the block runs."""
    with contextlib.ExitStack() as stack:
        for name in names:
            original = getattr(owner, name)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    events.append((_name, t0, time.perf_counter() - t0))

            stack.enter_context(mock.patch.object(owner, name, wrapper))
        yield


def mlflow_share(prep: Path, out: Path, quick: bool) -> dict:
    """ViT training through tasks.train.trainer.train: time inside metric logging vs the training loop's time.

    The loop's time is from the first metric `add` (one per step, right after the optimiser step) to the last: steps
    2..N with all their logging; evaluation and the checkpoint come only after the last step here (eval_every and
    ckpt_every > max_steps), so they are outside it.
    """
    from mlflow import MlflowClient

    from tasks.infra import tracking
    from tasks.train.trainer import TrainConfig, train

    steps = 6 if quick else 41
    cfg = TrainConfig(max_steps=steps, batch_size=8 if quick else 64, log_every=2 if quick else 10,
                      eval_every=10**6, ckpt_every=10**6, warmup_steps=1)
    logging: list[tuple[str, float, float]] = []
    client: list[tuple[str, float, float]] = []
    calls = ("create_run", "log_batch", "log_inputs", "log_artifact", "set_terminated", "update_run",
             "get_experiment_by_name", "create_experiment")
    t0 = time.perf_counter()
    with timed(tracking.MetricBuffer, ("add", "flush"), logging), timed(MlflowClient, calls, client):
        train("vit", prep, out, cfg, preset="tiny" if quick else "default")
    total = time.perf_counter() - t0
    adds = [start for name, start, _ in logging if name == "add"]
    window = adds[-1] - adds[0]
    inside = {n: sum(d for name, start, d in logging if name == n and adds[0] <= start < adds[-1])
              for n in ("add", "flush")}
    return {"steps": steps, "log_every": cfg.log_every, "window_s": window, "logging_s": inside,
            "logging_share": sum(inside.values()) / window, "train_s": total,
            "mlflow_client_total_s": sum(d for _, _, d in client),
            "mlflow_client_calls": {n: sum(1 for name, _, _ in client if name == n) for n in calls}}


def measure(work: Path, quick: bool, dest: Path | None = None) -> dict:
    """The child process's work: start the API, MLflow share, warm up, alternate Prefect and plain runs, re-run
    cached. With `dest`, what is measured so far is written there after each phase."""
    from prefect import flow, task

    from benchmarks.loading import build

    result: dict = {}

    def save(**kw):
        result.update(kw)
        if dest is not None:
            dest.write_text(json.dumps(result, default=str))

    @flow(name="bench-empty")
    def empty() -> int:
        return 0

    work_s = 0.05 if quick else 2.0  # longer than a second: Prefect's concurrency-lease costs show up then

    @task(name="bench-sleep")
    def noop(i: int) -> int:
        time.sleep(work_s)  # a task that takes a while (a lease or heartbeat thread then runs) but uses no CPU
        return i

    @flow(name="bench-task-costs")
    def task_costs(n: int, options: dict, start: int) -> list[float]:
        """Seconds Prefect adds to each of n calls of a sleeping task with these options, timed inside the flow
        (inputs start, start + 1, ...: never seen before, so never a cache hit)."""
        one = noop.with_options(**options)
        out = []
        for i in range(start, start + n):
            t0 = time.perf_counter()
            one(i)
            out.append(time.perf_counter() - t0 - work_s)
        return out

    t0 = time.perf_counter()
    empty()
    save(server_start_s=time.perf_counter() - t0)
    # Prefect's fixed costs: a flow run, and a task run (one that sleeps): with Prefect's default options, with the
    # project's (content-digest cache policy, persisted result: tasks/stages.py `stage`), and with the train task's
    # concurrency tag as well (tasks/stages.py)
    import tasks.infra.common
    from tasks.stages import stage
    from tasks.stages import train_model

    project = stage(tasks.infra.common)
    kinds = {"default": {}, "project": project, "project_train_tags": {**project, "tags": list(train_model.tags)}}
    fixed: dict = {"empty_flow": [], **{k: [] for k in kinds}}
    n = 2 if quick else 3
    for rep in range(1 if quick else 2):
        t0 = time.perf_counter()
        empty()
        fixed["empty_flow"].append(time.perf_counter() - t0)
        for j, (k, options) in enumerate(kinds.items()):
            fixed[k] += task_costs(n, options, (rep * len(kinds) + j) * n)
    save(fixed=fixed, train_tags=list(train_model.tags), work_s=work_s)
    _, prep, _ = build(work / "mlflow-data", 24 if quick else 400, 4, maxcount=16 if quick else 100)
    save(mlflow=mlflow_share(prep, work / "mlflow-train", quick))
    counts: dict[str, int] = {}
    with plain_calls(counts):
        t0 = time.perf_counter()
        run_flow(work / "warmup", quick)
        save(warmup_plain_s=time.perf_counter() - t0, calls=dict(counts))
    times: dict[str, list[float]] = {"prefect": [], "plain": []}
    for i in range(1 if quick else 2):
        t0 = time.perf_counter()
        run_flow(work / f"prefect{i}", quick)
        times["prefect"].append(time.perf_counter() - t0)
        if i == 0:  # at once, so that nothing (a code edit elsewhere) can change a cache key in between
            t0 = time.perf_counter()
            state = run_flow(work / "prefect0", quick, return_state=True)
            save(cached_s=time.perf_counter() - t0, cached_states=_task_states(state))
        with plain_calls({}):
            t0 = time.perf_counter()
            run_flow(work / f"plain{i}", quick)
            times["plain"].append(time.perf_counter() - t0)
        save(times=times)
    return result


def _task_states(state) -> dict[str, int]:
    """Counts of final task-run state names of a flow run and its subflows (Cached, Completed, ...)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            ids = [flow_run_id] + [f.id for f in subflows]
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        names = [r.state_name for r in runs if r.task_key and r.name.split("-")[0] != "data"]
        if not {"Pending", "Running"} & set(names) or time.monotonic() > deadline:
            break
        time.sleep(1)
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def run(quick: bool = False, in_process: bool = False) -> list[Row]:
    """in_process: measure here, with the Prefect API and MLflow store the caller has set up (tests)."""
    with tempfile.TemporaryDirectory(prefix="tessera-bench-orch-") as tmp:
        tmp = Path(tmp)
        if in_process:
            return rows_of(measure(tmp / "work", quick), quick)
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_LEVEL": "WARNING",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        out = tmp / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.orchestration", str(out), str(tmp / "work")] + (["--quick"] if quick
                                                                                                else [])
        with open(tmp / "child.log", "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
        if proc.returncode:
            tail = (tmp / "child.log").read_text()[-3000:]
            raise RuntimeError(f"orchestration child failed (exit {proc.returncode}): {tail}")
        return rows_of(json.loads(out.read_text()), quick)


def rows_of(r: dict, quick: bool) -> list[Row]:
    t = {k: median(v) for k, v in r["times"].items()}
    n_tasks = r["calls"].get("tasks", 0)
    n_runs = n_tasks + r["calls"].get("flows", 0)
    flow_s = median(r["fixed"]["empty_flow"])
    task_ms = {k: median(r["fixed"][k]) * 1e3 for k in ("default", "project", "project_train_tags")}
    tag_max_ms = max(r["fixed"]["project_train_tags"]) * 1e3
    size = ("data flow, 16 images + 8 clips" if quick else
            f"pipeline flow, 72 images + 36 clips, tiny {'/'.join(MODELS)} (6 steps), eval, round trips, CLIP index")
    sizes = f"{size}; {n_tasks} task runs + {r['calls'].get('flows', 0)} flow runs"
    rows = []
    ratio = t["prefect"] / t["plain"]
    per_task_ms = (t["prefect"] - t["plain"]) / max(n_runs, 1) * 1e3
    passed = check(ratio, TARGETS["prefect"])
    tags = ", ".join(r.get("train_tags") or []) or "none"
    note = (f"{per_task_ms:.0f} ms more per task/flow run in this pipeline; measured alone, Prefect adds per run of a "
            f"task that only sleeps {r.get('work_s', 0):g} s: {task_ms['default']:.0f} ms with Prefect's default "
            f"options, {task_ms['project']:.0f} ms with the project's (content-digest cache key, persisted result), "
            f"{task_ms['project_train_tags']:.0f} ms (up to {tag_max_ms:.0f} ms) with the train task's concurrency tag "
            f"too ({tags}: a slot lease through the API per run, even with no limit set), and an empty flow run "
            f"{flow_s * 1e3:.0f} ms (its exit waits for the flow's heartbeat thread, which sleeps in 1 s steps); the "
            f"temporary API server's start ({r['server_start_s']:.1f} s) is not counted")
    if not passed:
        note = (f"miss: Prefect adds {100 * (ratio - 1):.1f}% to a run whose {n_runs} task and flow runs take "
                f"{t['plain'] / max(n_runs, 1):.1f} s each on average: fixed costs per run (state changes through "
                "the local API, cache keys, result files) are large next to such small tasks; " + note)
    rows.append(Row("prefect_overhead", "time ratio (under Prefect s / plain calls s)", sizes,
                    f"plain calls (.fn): {t['plain']:.1f} s", f"Prefect flow: {t['prefect']:.1f} s", round(ratio, 3),
                    TARGETS["prefect"], passed, note,
                    extra={"seconds": r["times"], "per_task_ms": per_task_ms, "server_start_s": r["server_start_s"],
                           "calls": r["calls"], "fixed_s": r["fixed"], "noop_task_ms": task_ms,
                           "train_tags": r.get("train_tags"),
                           "empty_flow_s": flow_s}))
    ratio = r["cached_s"] / r["times"]["prefect"][0]
    passed = check(ratio, TARGETS["cached"])
    states = ", ".join(f"{v} {k}" for k, v in sorted(r["cached_states"].items()))
    note = f"task states of the re-run: {states}"
    if not passed:
        note = (f"miss: the cached re-run takes {100 * ratio:.1f}% of the first, {r['cached_s']:.1f} s: the fixed "
                f"costs of {n_runs} task and flow runs (above: {task_ms['project']:.0f} ms a task, "
                f"{flow_s * 1e3:.0f} ms a flow) "
                "and the "
                "pipeline's parent MLflow run stay, and the first run is only "
                f"{r['times']['prefect'][0]:.0f} s of work; " + note)
    rows.append(Row("cached_rerun", "time ratio (cached re-run s / first run s)", sizes,
                    f"first run under Prefect: {r['times']['prefect'][0]:.1f} s",
                    f"re-run, nothing changed: {r['cached_s']:.1f} s", round(ratio, 3), TARGETS["cached"], passed,
                    note, extra={"cached_states": r["cached_states"]}))
    ml = r["mlflow"]
    share = ml["logging_share"]
    passed = check(share, TARGETS["mlflow"])
    note = (f"{ml['steps']} steps, metrics sent every {ml['log_every']} (one log_batch each); every MLflow client call "
            f"of the run (create, params, dataset, checkpoint artifact, end) took {ml['mlflow_client_total_s']:.2f} s "
            f"of train()'s {ml['train_s']:.1f} s")
    if not passed:
        note = f"miss: metric logging is {100 * share:.1f}% of the loop; " + note
    rows.append(Row("mlflow_logging", "share (time in metric logging / training loop time)",
                    f"tasks.train.trainer.train, ViT {'tiny' if quick else 'default'} config, SQLite store",
                    f"training loop: {ml['window_s']:.2f} s", f"metric logging: {sum(ml['logging_s'].values()):.3f} s",
                    round(share, 4), TARGETS["mlflow"], passed, note, extra=ml))
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    dest, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    measure(work, quick, dest)
