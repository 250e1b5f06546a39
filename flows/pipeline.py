"""The `pipeline` flow: data -> codebooks -> train each model -> evaluate -> round trips -> CLIP index -> register
-> summary.

One MLflow parent run per flow run (tagged with the Prefect flow-run id); every stage and model reports in a
nested run under it. The models train in lanes side by side, one a CPU core (`lanes`): each trains on one thread, and
two trainings on a two-core machine each keep ~97% of their speed alone. A model that starts from another (model
table `init`: CLIP's image tower from the trained ViT's stem) trains after it in its lane, and its cache key includes
that checkpoint.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from flows.data import data_flow
from flows.deploy import start_flow_run, train_slot_watch
from flows.params import PipelineParams, TrainParams
from tasks import stages
from tasks.infra import tracking
from tasks.data.codebook import CodebookConfig
from tasks.data.shards import test_sets
from tasks.eval import roundtrip as roundtrip_lib
from tasks.eval.registry import Registration
from tasks.index import IndexConfig
from tasks.infra.hardware import cpu_threads, pick_device
from tasks.train.batches import CODEBOOKS
from tasks.train.budget import machine_slowdown, run_training_minutes
from tasks.train.table import plan, spec, with_role
from tasks.train.trainer import TrainConfig, default_train_config


def training_minutes(p: PipelineParams, root: Path) -> float | None:
    """The minutes the run's models train in together: --train-minutes, or what --run-minutes leaves for training on
    this machine (tasks/train/budget.py `run_training_minutes`, its slowdown probed once per root), the smaller of the
    two when both are given; None: neither (each model its own cap)."""
    t = p.train
    if t.run_minutes is None:
        return t.train_minutes
    slowdown, probed = machine_slowdown(root, t.device, t.precision)
    minutes = run_training_minutes(t.run_minutes, slowdown)
    print(f"run minutes {t.run_minutes:g}: training here takes {slowdown:.2f}x the reference machine's time "
          f"({'probed now' if probed else 'probed before'}, {root / 'machine.json'}), so the models train within "
          f"{minutes:.2f} minutes" + (f" (--train-minutes {t.train_minutes:g})" if t.train_minutes and
                                      t.train_minutes < minutes else ""))
    return min(minutes, t.train_minutes or minutes)


def minutes_left(left: float | None, record: dict, cap: float | None) -> float | None:
    """The training minutes the models after this one share: `left` less the minutes its training took (its record's
    `train_seconds`, so a model that finishes under its cap leaves the rest to the later ones, and a cached re-run
    plans the same caps, hence the same cache keys). A record without the field counts its whole cap; never below
    1% of `left`, so a later model still gets a cap rather than none."""
    if left is None:
        return None
    spent = record["train_seconds"] / 60 if "train_seconds" in record else (cap or 0.0)
    return max(left - spent, 0.01 * left)


def train_config(model: str, p: PipelineParams, models: list[str] | None = None, minutes: float | None = None):
    """The model's TrainConfig: the table's, the run's flags, then its train_overrides. With training minutes (given,
    else --train-minutes), its time cap is its share of them among `models` (the run's), by each one's minutes in the
    default run; a model the run's minutes do not cut (table `time_capped`) keeps its own cap (MODEL_MINUTES). On the
    built-in set the table's `builtin_train` fields come before train_overrides."""
    t = p.train
    minutes = minutes or t.train_minutes
    share = (minutes * spec(model).minutes / sum(spec(m).minutes for m in models or [model])
             if minutes and spec(model).time_capped else None)
    fields = {k: v for k, v in dict(max_steps=t.steps, epochs=None if t.steps else t.epochs, patience=t.patience,
                                    batch_size=t.batch_size, device=t.device, precision=t.precision,
                                    compile=t.compile, max_minutes=share).items()
              if v is not None}  # --steps wins over --epochs
    builtin = spec(model).builtin_train if p.data.builtin else {}  # under the run's own overrides
    return default_train_config(model, **{**fields, **builtin, **t.train_overrides.get(model, {})})


def train_order(models: list[str]) -> list[str]:
    """The models in the given order, except that a model another one starts from (model table `init`) comes first,
    then those the run's minutes do not cut (table `time_capped`), so the others share what they leave."""
    sources = [spec(m).init[0] for m in models if spec(m).init and spec(m).init[0] in models]
    first = [m for m in models if m in sources]
    uncut = [m for m in models if m not in first and not spec(m).time_capped]
    return first + uncut + [m for m in models if m not in first and m not in uncut]


def plan_models(params: PipelineParams, stats: dict) -> list[str]:
    """The models to train, in training order: those named (or every model the data can feed), one printed line per
    model left out and why; a named model the data cannot feed is a one-line ValueError before any training."""
    planned, skipped = plan(params.train.models, stats, params.train.batch_size)
    for m, why in skipped.items():
        print(f"skipping {m}: {why}")
    if not planned:
        raise ValueError("the data can feed none of the models: " + "; ".join(f"{m}: {w}" for m, w in skipped.items()))
    return train_order(planned)


def data_summary(data: dict) -> dict:
    """What the data stages kept, refused, skipped and changed (the run's data/summary.json in MLflow)."""
    ingest = data["ingest"]
    return {"items": ingest["n_items"], "quarantined": ingest["n_quarantined"], "reasons": ingest.get("reasons", {}),
            "skipped": ingest.get("skipped", {}), "changes": {**ingest.get("changes", {}),
                                                               **data["prep"].get("changes", {})},
            "splits": data["shards"]["counts"], "clip_window": data["prep"].get("window")}


def codebook_config(params: PipelineParams, models: list[str]) -> CodebookConfig:
    """The codebook stage's config, fitting only the codebooks the planned models read."""
    kinds = tuple(k for k in CODEBOOKS if any(spec(m).codebook == k for m in models))
    return CodebookConfig(**params.codebooks.model_dump(), kinds=kinds)


def _fmt(v) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) >= 10 else f"{v:.3g}"


def _pairs(items) -> str:
    """(name, value) pairs -> "name value, name value" (values by _fmt)."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in items)


def _register(params: PipelineParams, data: dict, trained: dict, evals: dict, prep: Path, cb: dict) -> dict:
    """Each model's validation-best checkpoint as a version of `tessera-<dataset>-<model>` (tasks/eval/registry.py)."""
    reg = Registration(params.dataset_name, data["shards"]["digest"], params.train.preset)
    return {m: stages.register_model.with_options(task_run_name=f"register-{m}")(
        m, rec, evals[m]["metrics"], prep, {k: Path(cb[k]) for k in [spec(m).codebook] if k}, reg)
        for m, rec in trained.items()}


def _summary(trained: dict, evals: dict, trips: dict | None, index: dict | None, registered: dict,
             builtin: bool = True) -> str:
    """One row per model: its headline test metric first (table `headline`), then validation, then the rest; one row
    per round trip, its headline metrics first (ROUND_TRIPS `headline`), and those a trained generator could not take
    and why (a judge not trained in this run)."""
    lines = ["| model | steps | headline (test) | val | other test metrics |", "|---|---|---|---|---|"]
    for m, rec in trained.items():
        test = evals.get(m, {}).get("metrics", {})
        head = next((k for k in spec(m).headline if k in test), None)
        val = ", ".join(f"{k.removeprefix('val/')} {_fmt(v)}" for k, v in sorted(rec.get("metrics", {}).items()))
        rest = _pairs((k, v) for k, v in sorted(test.items()) if k != head)
        headline = "; ".join([f"{head} {_fmt(test[head])}" if head else ""] + [
            f"{s}: {head} {_fmt(other[head])}" for s, other in evals.get(m, {}).get("others", {}).items()
            if head in other])
        lines.append(f"| {m} | {rec['steps']} | {headline} | {val or 'no val split'} | {rest} |")
    if trips and trips["metrics"]:
        lines += ["", "| round trip | headline (test) | other metrics |", "|---|---|---|"]
        for name, trip in roundtrip_lib.ROUND_TRIPS.items():
            got = {k.removeprefix(f"{name}/"): v for k, v in trips["metrics"].items() if k.startswith(f"{name}/")}
            if not got:
                continue
            head = [k for k in trip.headline if k in got]
            lines.append(f"| {name} | {_pairs((k, got[k]) for k in head)} | "
                         f"{_pairs((k, v) for k, v in sorted(got.items()) if k not in head)} |")
        if trips.get("path"):
            lines += ["", f"round trips' grids, WAVs and spectrograms: `{trips['path']}/summary.md`"]
    if trips is not None:
        roles = {spec(m).role for m in trained if spec(m).role}
        skipped = []
        for name, why in roundtrip_lib.not_run(roles, builtin).items():
            add = [with_role(r) for r in roundtrip_lib.ROUND_TRIPS[name].roles if r not in roles]
            hint = f" (add {' '.join(add)} to --models)" if add else ""
            skipped.append(f"- round trip {name} not run: it {why}{hint}")
        lines += ["", *skipped] if skipped else []
    if registered:
        lines += ["", "registered: " + ", ".join(
            f"{r['registered_name']} v{r['version']}" + (f" (champion v{r['champion']})" if r["champion"] else "")
            for r in registered.values())]
    if index:
        lines += ["", f"CLIP index: `{index['path']}` — search it with `tessera search TEXT` or `--image FILE`"]
    return "\n".join(lines)


def lane_count(t: TrainParams) -> int:
    """--lanes, else on a CPU one lane a core (a model trains on TrainConfig.cpu_threads threads, one), on a GPU or
    under torchrun (WORLD_SIZE > 1: every rank must run the same trainings' collectives in the same order) one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 1
    if t.lanes:
        return t.lanes
    if pick_device(t.device).type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // max(TrainConfig.cpu_threads, 1))


def lanes(models: list[str], n: int) -> list[list[str]]:
    """The models (in training order) split into at most n lanes that train side by side: a model another starts from
    (table `init`) and that one share a lane; the groups go, longest first (table `minutes`), to the lane with the
    fewest minutes so far; each lane keeps the training order."""
    groups: list[list[str]] = []
    for m in models:
        source = spec(m).init[0] if spec(m).init else None
        group = next((g for g in groups if source in g), None)
        if group is None:
            groups.append([m])
        else:
            group.append(m)
    load = [0.0] * max(1, min(n, len(groups)))
    out: list[list[str]] = [[] for _ in load]
    for group in sorted(groups, key=lambda g: -sum(spec(m).minutes for m in g)):
        i = load.index(min(load))
        out[i] += group
        load[i] += sum(spec(m).minutes for m in group)
    return [[m for m in models if m in lane] for lane in out if lane]


def run_lanes(lanes: list[Callable[[], Any]]) -> list:
    """Each function in a thread of its own (Prefect's context copied in), one torch thread each (and none restored to
    more while another lane trains: hardware.cpu_threads); their results in order. A lane that fails lets the others
    finish (their work is cached) before its error is raised. An interrupt (Ctrl-C, SIGTERM: a BaseException) in the
    main thread or in a lane is raised in every lane still running too, so their trainings end KILLED at once rather
    than run to their end."""
    running: dict[int, int] = {}  # lane -> its thread's id, while it runs
    lock = threading.Lock()

    def start(i: int, fn: Callable[[], Any]):
        with lock:
            running[i] = threading.get_ident()
        try:
            return fn()
        finally:
            with lock:
                running.pop(i, None)

    with cpu_threads(1), ThreadPoolExecutor(len(lanes), thread_name_prefix="lane") as pool:
        futures = [pool.submit(contextvars.copy_context().run, start, i, fn) for i, fn in enumerate(lanes)]
        try:
            return [f.result() for f in futures]
        except BaseException as e:
            if not isinstance(e, Exception):
                with lock:
                    for ident in running.values():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                   ctypes.py_object(KeyboardInterrupt))
            raise


def _train_and_evaluate(params: PipelineParams, models: list[str], prep: Path, counts: dict, cb: dict, root: Path,
                        run: dict, minutes: float | None = None) -> tuple[dict, dict]:
    """Train each model (a model that starts from another after it: table `init`), then evaluate it on each test set
    of its modality (`counts`: stats.json's items per modality and split): evals[model] is the first set's record
    (`test`), with the others' under "others". The models train in lanes side by side (`lanes`, threads: a training
    step releases the GIL); each lane shares the whole of the training minutes among its own models."""

    def lane(ms: list[str]) -> tuple[dict, dict]:
        trained, evals = {}, {}
        left = minutes or params.train.train_minutes  # what the lane's models not yet trained share (carried forward)
        for i, m in enumerate(ms):
            needs = {k: Path(cb[k]) for k in [spec(m).codebook] if k}
            source = spec(m).init[0] if spec(m).init and params.train.init_from_trained else None
            init = Path(trained[source]["checkpoint"]) if source in trained else None
            cfg = train_config(m, params, ms[i:], left)
            trained[m] = stages.train_model.with_options(task_run_name=f"train-{m}")(
                m, prep, needs, cfg, root, params.train.preset, params.train.model_overrides.get(m), init_from=init,
                **run)
            left = minutes_left(left, trained[m], cfg.max_minutes)
            sets = [stages.evaluate_model.with_options(task_run_name=f"eval-{m}" + (f"-{s}" if s != "test" else ""))(
                m, Path(trained[m]["checkpoint"]), prep, needs, root, params.eval.max_samples,
                run_id=trained[m]["run_id"], experiment=params.experiment, builtin=params.data.builtin, split=s)
                for s in test_sets(counts.get(spec(m).modality, {})) or ["test"]]
            evals[m] = {**sets[0], "others": {r["split"]: r["metrics"] for r in sets[1:]}}
        return trained, evals

    groups = lanes(models, lane_count(params.train))
    if len(groups) == 1:
        results = [lane(groups[0])]
    else:
        print(f"training in {len(groups)} lanes side by side: " + " | ".join(", ".join(g) for g in groups))
        results = run_lanes([functools.partial(lane, g) for g in groups])
    trained = {m: r for t, _ in results for m, r in t.items()}
    evals = {m: r for _, e in results for m, r in e.items()}
    return {m: trained[m] for m in models}, {m: evals[m] for m in models}


def _across(params: PipelineParams, trained: dict, prep: Path, cb: dict, root: Path, run: dict):
    """The round trips among the trained models that play their roles, and the CLIP index."""
    ckpts = {m: Path(r["checkpoint"]) for m, r in trained.items()}
    all_cbs = {k: Path(cb[k]) for k in CODEBOOKS if k in cb}
    trip_ckpts = {m: c for m, c in ckpts.items() if spec(m).role}
    trips = (stages.roundtrips(trip_ckpts, prep, all_cbs, root, builtin=params.data.builtin, **run)
             if params.eval.roundtrips else None)
    indexer = with_role("image-text", list(ckpts))
    index = None
    if indexer:
        index = stages.clip_index(prep, ckpts[indexer], IndexConfig(exact_threshold=params.index.exact_threshold,
                                                              splits=tuple(params.index.splits)),
                                  root, **run)
    return trips, index


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    start_flow_run(runtime.flow_run.id)  # tag this run with its process; end the runs of dead ones (Crashed)
    data = data_flow(params.data)
    root = Path(params.data.root).resolve()
    prep = Path(data["prep"]["path"])
    stats = json.loads((prep / "stats.json").read_text())
    models = plan_models(params, stats)
    tags = {"prefect.flow_run_id": str(runtime.flow_run.id), tracking.DATASET_TAG: params.dataset_name,
            tracking.DIGEST_TAG: data["shards"]["digest"]}  # every nested run inherits the dataset's two tags
    with (tracking.start_run(params.experiment, f"pipeline-{runtime.flow_run.name or 'local'}", tags=tags) as parent,
          train_slot_watch(runtime.flow_run.id)):  # a training that waits for a GPU slot says for what
        parent.log_params(params.model_dump(mode="json"))
        parent.log_dataset("tessera-shards", data["shards"]["digest"], data["shards"]["path"])
        parent.client.log_dict(parent.run_id, data_summary(data), "data/summary.json")
        run = dict(parent_run_id=parent.run_id, experiment=params.experiment)
        cb = stages.fit_codebooks(prep, codebook_config(params, models), root, **run)
        trained, evals = _train_and_evaluate(params, models, prep, stats["counts"], cb, root, run,
                                             training_minutes(params, root))
        trips, index = _across(params, trained, prep, cb, root, run)
        registered = _register(params, data, trained, evals, prep, cb)  # only once every stage has succeeded
        summary = _summary(trained, evals, trips, index, registered, params.data.builtin)
        parent.client.log_text(parent.run_id, summary, "summary.md")
    create_markdown_artifact(summary, key="pipeline-summary", description="tessera pipeline")
    print(summary)
    return {"data": data, "codebooks": cb, "train": trained, "eval": evals, "roundtrips": trips, "index": index,
            "registered": registered}
