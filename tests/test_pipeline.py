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


def _params(root, **train) -> PipelineParams:
    return PipelineParams(
        data=DataParams(root=root, size=72, n_mels=32, n_frames=64, shard_maxcount=32),
        codebooks=CodebookParams(pixels_k=16, image_k=32, mel_k=32),
        train=TrainParams(preset="tiny", steps=6, batch_size=8, **train),
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
    exp = client.get_experiment_by_name("tessera")
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
        assert client.get_registered_model(f"tessera-{m}").latest_versions
    assert "codebooks" in children and "clip-index" in children
    assert parents[0].inputs.dataset_inputs  # dataset lineage
    summary = json.loads(Path(client.download_artifacts(parent_id, "data/summary.json", str(root))).read_text())
    assert summary["quarantined"] == 0 and sum(summary["items"].values()) == sum(
        n for counts in summary["splits"].values() for n in counts.values())  # every item kept is in a split


def test_second_run_comes_from_the_cache(first_run):
    root, state = first_run
    again = pipeline(_params(root / "out"), return_state=True)
    assert again.result()["index"] == state.result()["index"]
    states = _states(again.state_details.flow_run_id, at_least=1 + 7 + 7 + 2)
    assert len(states) >= 1 + 7 + 7 + 2  # codebooks, train x7, eval x7, round trips, index (data: test_data_flow)
    assert set(states.values()) == {"Cached"}, {k: v for k, v in states.items() if v != "Cached"}


def test_changing_one_model_reruns_only_what_depends_on_it(first_run):
    root, _ = first_run
    changed = pipeline(_params(root / "out", train_overrides={"ast": {"lr": 1e-3}}), return_state=True)
    states = _states(changed.state_details.flow_run_id)
    assert {k for k, v in states.items() if v == "Completed"} == {"train-ast", "eval-ast"}, states
    assert {k for k, v in states.items() if v != "Completed"} and set(states.values()) == {"Completed", "Cached"}


def test_search_cli(first_run, capsys):
    root, state = first_run
    from flows.cli import write_latest

    write_latest(root / "out", state.result())
    assert cli_main(["search", "a", "red", "circle", "--root", str(root / "out"), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("img-") >= 3
    assert cli_main(["search", "x", "--root", str(root / "nowhere")]) == 2
    assert "tessera run" in capsys.readouterr().err
