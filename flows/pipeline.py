"""The `pipeline` flow: data -> codebooks -> train each model -> evaluate -> round trips -> CLIP index -> summary.

One MLflow parent run per flow run (tagged with the Prefect flow-run id); every stage and model reports in a
nested run under it. Independent models could run concurrently (`.submit`); on a 2-core CPU one at a time is
faster, so they run in order here. A model that starts from another (model table `init`: CLIP's image tower from the
trained ViT's stem) trains after it, and its cache key includes that checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from flows.data import data_flow
from flows.params import PipelineParams
from tasks import stages
from tasks.infra import tracking
from tasks.data.codebook import CodebookConfig
from tasks.index import IndexConfig
from tasks.train.batches import CODEBOOKS
from tasks.train.table import spec, with_role
from tasks.train.trainer import default_train_config


def train_config(model: str, p: PipelineParams):
    t = p.train
    fields = {k: v for k, v in dict(max_steps=t.steps, batch_size=t.batch_size, device=t.device,
                                    precision=t.precision, compile=t.compile).items() if v is not None}
    return default_train_config(model, **{**fields, **t.train_overrides.get(model, {})})


def train_order(models: list[str]) -> list[str]:
    """The models in the given order, except that a model another one starts from (model table `init`) comes first."""
    sources = [spec(m).init[0] for m in models if spec(m).init and spec(m).init[0] in models]
    return [m for m in models if m in sources] + [m for m in models if m not in sources]


def _summary(trained: dict, evals: dict, trips: dict | None, index: dict | None) -> str:
    lines = ["| model | steps | val loss | test metrics |", "|---|---|---|---|"]
    for m, rec in trained.items():
        metrics = ", ".join(f"{k} {v:.3g}" for k, v in sorted(evals.get(m, {}).get("metrics", {}).items())[:6])
        lines.append(f"| {m} | {rec['steps']} | {rec.get('final_val_loss') or float('nan'):.3f} | {metrics} |")
    if trips:
        lines += ["", "round trips: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(trips["metrics"].items()))]
    if index:
        lines += ["", f"CLIP index: `{index['path']}` — try `tessera search \"a red circle\"`"]
    return "\n".join(lines)


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    data = data_flow(params.data)
    root = Path(params.data.root).resolve()
    prep = Path(data["prep"]["path"])
    with tracking.start_run(params.experiment, f"pipeline-{runtime.flow_run.name or 'local'}",
                            tags={"prefect.flow_run_id": str(runtime.flow_run.id)}) as parent:
        parent.log_params(params.model_dump(mode="json"))
        parent.log_dataset("tessera-shards", data["shards"]["digest"], data["shards"]["path"])
        run = dict(parent_run_id=parent.run_id, experiment=params.experiment)
        cb = stages.fit_codebooks(prep, CodebookConfig(**params.codebooks.model_dump()), root, **run)
        trained, evals = {}, {}
        for m in train_order(params.train.models):
            needs = {k: Path(cb[k]) for k in [spec(m).codebook] if k}
            source = spec(m).init[0] if spec(m).init and params.train.init_from_trained else None
            init = Path(trained[source]["checkpoint"]) if source in trained else None
            trained[m] = stages.train_model.with_options(task_run_name=f"train-{m}")(
                m, prep, needs, train_config(m, params), root, params.train.preset,
                params.train.model_overrides.get(m), init_from=init, **run)
            evals[m] = stages.evaluate_model.with_options(task_run_name=f"eval-{m}")(
                m, Path(trained[m]["checkpoint"]), prep, needs, root, params.eval.max_samples,
                run_id=trained[m]["run_id"], experiment=params.experiment)
        ckpts = {m: Path(r["checkpoint"]) for m, r in trained.items()}
        all_cbs = {k: Path(cb[k]) for k in CODEBOOKS if k in cb}
        trip_ckpts = {m: c for m, c in ckpts.items() if spec(m).role}
        trips = stages.roundtrips(trip_ckpts, prep, all_cbs, root, **run) if params.eval.roundtrips else None
        index = None
        indexer = with_role("image-text", list(ckpts))
        if indexer:
            index = stages.clip_index(prep, ckpts[indexer], IndexConfig(exact_threshold=params.index.exact_threshold),
                                      root, **run)
        summary = _summary(trained, evals, trips, index)
        parent.client.log_text(parent.run_id, summary, "summary.md")
    create_markdown_artifact(summary, key="pipeline-summary", description="tessera pipeline")
    print(summary)
    return {"data": data, "codebooks": cb, "train": trained, "eval": evals, "roundtrips": trips, "index": index}
