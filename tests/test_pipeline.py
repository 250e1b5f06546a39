"""End to end: the pipeline flow on a tiny built-in set, its MLflow record, its cache, and search."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

from flows.cli import main as cli_main
from flows.params import CodebookParams, DataParams, EvalParams, PipelineParams, TrainParams
from flows.pipeline import pipeline

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _states(flow_run_id, wait_s: float = 120, at_least: int = 0) -> dict[str, str]:
    """task run name -> final state name, for a flow run and its subflow runs (the data flow).

    Prefect 3 reports task runs to its API in the background: poll until at least `at_least` are there and none is
    left Pending/Running.
    """
    deadline = time.monotonic() + wait_s
    while True:
        states = _read_states(flow_run_id)
        settled = len(states) >= at_least and not {"Pending", "Running"} & set(states.values())
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(1)


def _read_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id] + [f.id for f in subflows]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    # a subflow shows up in its parent as a task run too; keep real tasks only
    return {r.name: r.state_name for r in runs if r.task_key and not r.name.startswith("data-")}


# The ViT warms up 200 steps by default; in 6 its learning rate would stay under 3% of the peak, and the CLIP that starts
# from its stem then sat on the index's collapse threshold (57% of probes on one image against 50%) in one run of two.
BASE_OVERRIDES = {"vit": {"warmup_steps": 50}}


def _params(root, train_overrides: dict | None = None, **train) -> PipelineParams:
    overrides = {m: {**BASE_OVERRIDES.get(m, {}), **(train_overrides or {}).get(m, {})}
                 for m in {*BASE_OVERRIDES, *(train_overrides or {})}}
    return PipelineParams(
        data=DataParams(root=root, size=72, n_mels=32, n_frames=64, shard_maxcount=32),
        codebooks=CodebookParams(pixels_k=16, image_k=32),
        train=TrainParams(preset="tiny", steps=6, batch_size=8, train_overrides=overrides, **train),
        eval=EvalParams(max_samples=16),
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    import os

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    state = pipeline(_params(root / "out"), return_state=True)
    return root, state


def test_pipeline_trains_every_model_and_tracks_it(first_run):
    root, state = first_run
    assert state.is_completed()
    result = state.result()
    assert set(result["train"]) == {"vit", "ast", "clip", "imagegpt", "asr", "t2i", "tts"}
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("tessera-builtin")  # tessera-<dataset name>
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    for m in result["train"]:
        run = next(r for r in children.values() if r.info.run_id == result["train"][m]["run_id"])
        assert run.info.status == "FINISHED"
        assert "loss" in "".join(run.data.metrics), run.data.metrics  # training metrics
        assert any(k.startswith("test/") for k in run.data.metrics), (m, run.data.metrics)  # evaluation metrics
        assert run.data.tags["tessera.dataset"] == "builtin"  # inherited from the pipeline's run
        assert run.data.tags["tessera.dataset_digest"] == result["data"]["shards"]["digest"]
        version = client.get_model_version(f"tessera-builtin-{m}", result["registered"][m]["version"])
        assert version.run_id == run.info.run_id and version.tags["tessera.dataset"] == "builtin"
        assert result["registered"][m]["champion"] is None  # the tiny preset is never a champion
    assert "codebooks" in children and "clip-index" in children
    assert parents[0].inputs.dataset_inputs  # dataset lineage
    summary = json.loads(Path(client.download_artifacts(parent_id, "data/summary.json", str(root))).read_text())
    assert summary["quarantined"] == 0 and sum(summary["items"].values()) == sum(
        n for counts in summary["splits"].values() for n in counts.values())  # every item kept is in a split


def test_second_run_comes_from_the_cache(first_run, monkeypatch):
    root, state = first_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")  # the registry that holds the versions
    again = pipeline(_params(root / "out"), return_state=True)
    assert again.result()["index"] == state.result()["index"]
    states = _states(again.state_details.flow_run_id, at_least=1 + 7 + 7 + 2)
    assert len(states) >= 1 + 7 + 7 + 2  # codebooks, train x7, eval x7, round trips, index (data: test_data_flow)
    registers = {k for k in states if k.startswith("register-")}
    assert len(registers) == 7 and {states[k] for k in registers} == {"Completed"}  # asks the registry each time
    assert {v for k, v in states.items() if k not in registers} == {"Cached"}, states
    assert {m: r["new"] for m, r in again.result()["registered"].items()} == dict.fromkeys(state.result()["train"],
                                                                                          False)


def test_changing_one_model_reruns_only_what_depends_on_it(first_run, monkeypatch):
    root, _ = first_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    changed = pipeline(_params(root / "out", train_overrides={"ast": {"lr": 1e-3}}), return_state=True)
    states = _states(changed.state_details.flow_run_id)
    completed = {k for k, v in states.items() if v == "Completed" and not k.startswith("register-")}
    assert completed == {"train-ast", "eval-ast"}, states
    assert [m for m, r in changed.result()["registered"].items() if r["new"]] == ["ast"]
    assert {k for k, v in states.items() if v != "Completed"} and set(states.values()) == {"Completed", "Cached"}


def test_a_failed_pipeline_registers_nothing(first_run, monkeypatch):
    root, _ = first_run
    from tasks import stages

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    before = len(client.search_model_versions("name='tessera-builtin-vit'"))

    def evaluation_fails(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(stages.eval_lib, "evaluate", evaluation_fails)
    failed = pipeline(_params(root / "out", models=["vit"], train_overrides={"vit": {"lr": 1.5e-3}}),
                      return_state=True)
    assert failed.is_failed()
    states = _states(failed.state_details.flow_run_id)
    assert states["train-vit"] == "Completed" and states["eval-vit"] == "Failed"  # trained anew, then failed
    assert len(client.search_model_versions("name='tessera-builtin-vit'")) == before
    assert not any(k.startswith("register-") for k in states)


def test_search_cli(first_run, capsys):
    root, state = first_run
    from flows.cli import write_latest

    write_latest(root / "out", state.result())
    assert cli_main(["search", "a", "red", "circle", "--root", str(root / "out"), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("img-") >= 3
    assert cli_main(["search", "x", "--root", str(root / "nowhere")]) == 2
    assert "tessera run" in capsys.readouterr().err


def test_latest_keeps_the_other_models_when_one_retrains_on_the_same_data(tmp_path):
    """`tessera train tts` after `make run`: latest.json takes the new tts checkpoint and keeps the rest and the CLIP
    index (what `tessera search` reads); a run on other data starts it afresh."""
    from flows.cli import write_latest

    def result(prep, index, **ckpts):
        return {"data": {"prep": {"path": prep}}, "index": {"path": index} if index else None,
                "train": {m: {"checkpoint": c} for m, c in ckpts.items()}}

    write_latest(tmp_path, result("p1", "i1", vit="v1", tts="t1"))
    write_latest(tmp_path, result("p1", None, tts="t2"))
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest == {"index": "i1", "checkpoints": {"vit": "v1", "tts": "t2"}, "prep": "p1"}
    write_latest(tmp_path, result("p2", None, ast="a1"))
    assert json.loads((tmp_path / "latest.json").read_text()) == {"index": None, "checkpoints": {"ast": "a1"},
                                                                  "prep": "p2"}
