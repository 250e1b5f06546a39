"""The registry scheme: `tessera-<dataset>-<model>`, tags, `latest` and `champion` (tasks/eval/registry.py).
That a failed pipeline registers nothing: tests/test_pipeline.py::test_a_failed_pipeline_registers_nothing."""

from __future__ import annotations

from pathlib import Path

import mlflow.pytorch
import pytest
from mlflow import MlflowClient
from mlflow.store.artifact.utils.models import get_model_name_and_version

from tasks.eval import registry
from tasks.eval.registry import Registration
from tasks.infra import tracking
from tasks.infra.checkpoint import load_checkpoint, save_checkpoint


def _variant(src: Path, path: Path, scale: float) -> Path:
    """Another checkpoint of the same model (weights scaled: other bytes, so another version)."""
    ckpt = load_checkpoint(src)
    ckpt["state_dict"] = {k: v * scale if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    save_checkpoint(path, ckpt)
    return path


def _record(c: MlflowClient, ckpt: Path, val_acc: float, steps: int = 10, planned: int = 10,
            time_capped: bool = False) -> dict:
    run_id = c.create_run(tracking.experiment_id(c, "tessera-digits")).info.run_id
    return {"checkpoint": str(ckpt), "run_id": run_id, "steps": steps, "planned_steps": planned,
            "best_step": steps, "best_val": {"val/accuracy": val_acc, "val/loss": 1.0 - val_acc},
            "time_capped": time_capped}


def _latest(c: MlflowClient, name: str) -> str:
    return str(get_model_name_and_version(c, f"models:/{name}/latest")[1])


def test_versions_tags_latest_and_champion(builtin_world, tiny_checkpoints, tmp_path):
    c = tracking.client()
    prep, trained = builtin_world["prep"], tiny_checkpoints["trained"]["vit"]
    reg = Registration("digits", "d" * 64, "default")
    test = {"accuracy": 0.75, "per_class_min": 0.5}

    first = registry.register("vit", _record(c, trained, 0.6), test, prep, {}, reg)
    name = "tessera-digits-vit"
    assert first == {"registered_name": name, "version": "1", "champion": "1", "new": True}
    v1 = c.get_model_version(name, "1")
    assert v1.tags["tessera.dataset"] == "digits" and v1.tags["tessera.dataset_digest"] == "d" * 64
    assert v1.tags["tessera.preset"] == "default" and v1.tags["tessera.steps"] == "10"
    assert v1.tags["test.accuracy"] == "0.75" and v1.tags["val.accuracy"] == "0.6"
    assert "digits" in v1.description and "step 10" in v1.description and "test accuracy 0.75" in v1.description
    logged = c.get_logged_model(v1.source.removeprefix("models:/"))  # the LoggedModel of the training's run
    assert logged.experiment_id == c.get_experiment_by_name("tessera-digits").experiment_id
    assert logged.status == "READY" and v1.run_id == logged.source_run_id
    assert Path(tracking.artifact_root()) in Path(logged.artifact_location.removeprefix("file://")).parents

    worse = registry.register("vit", _record(c, _variant(trained, tmp_path / "b.pt", 0.5), 0.4), test, prep, {}, reg)
    assert (worse["version"], worse["champion"]) == ("2", "1")  # newest is latest, best by validation is champion
    tiny = Registration("digits", "d" * 64, "tiny")
    best_but_tiny = registry.register("vit", _record(c, _variant(trained, tmp_path / "c.pt", 0.25), 0.99), test,
                                      prep, {}, tiny)
    cut_short = registry.register("vit", _record(c, _variant(trained, tmp_path / "d.pt", 2.0), 0.98, steps=3), test,
                                  prep, {}, reg)
    assert (best_but_tiny["champion"], cut_short["champion"]) == ("1", "1")  # neither is eligible
    assert _latest(c, name) == "4"
    better = registry.register("vit", _record(c, _variant(trained, tmp_path / "e.pt", 3.0), 0.9), test, prep, {},
                               reg)
    assert better["champion"] == "5" and str(c.get_model_version_by_alias(name, "champion").version) == "5"
    capped = registry.register("vit", _record(c, _variant(trained, tmp_path / "f.pt", 4.0), 0.95, steps=6,
                                              time_capped=True), test, prep, {}, reg)
    assert capped["champion"] == "6"  # fewer steps, but the whole schedule the time cap left it: eligible

    again = registry.register("vit", _record(c, trained, 0.6), test, prep, {}, reg)  # the first checkpoint again
    assert (again["version"], again["new"]) == ("1", False)
    assert len(c.search_model_versions(f"name='{name}'")) == 6
    assert _latest(c, name) == "6"  # the newest version, not the last registered
    loaded = mlflow.pytorch.load_model(f"models:/{name}@champion")  # what a user loads
    assert loaded is not None


def test_names_follow_the_dataset(builtin_world, tiny_checkpoints):
    c = tracking.client()
    ckpt = tiny_checkpoints["trained"]["ast"]
    for dataset in ("fsdd4", "esc10"):
        out = registry.register("ast", _record(c, ckpt, 0.5), {"accuracy": 0.5}, builtin_world["prep"], {},
                                Registration(dataset, "0" * 64, "default"))
        assert out["registered_name"] == f"tessera-{dataset}-ast" and out["version"] == "1"
    with pytest.raises(ValueError, match="holds a ast model, not a vit"):
        registry.register("vit", _record(c, ckpt, 0.5), {}, builtin_world["prep"], {},
                          Registration("x", "0" * 64, "default"))


def test_the_dataset_name_defaults_and_names_the_experiment(tmp_path):
    from flows.params import DataParams, PipelineParams

    assert (PipelineParams().dataset_name, PipelineParams().experiment) == ("builtin", "tessera-builtin")
    (tmp_path / "Free Spoken Digits").mkdir()
    p = PipelineParams(data=DataParams(audio=tmp_path / "Free Spoken Digits"))
    assert (p.dataset_name, p.experiment) == ("Free-Spoken-Digits", "tessera-Free-Spoken-Digits")
    assert PipelineParams(dataset_name="fsdd4", experiment="mine").experiment == "mine"
    with pytest.raises(ValueError, match="--dataset-name 'my data'"):
        PipelineParams(dataset_name="my data")


def test_a_nested_run_carries_its_parents_dataset_tags():
    c = tracking.client()
    tags = {tracking.DATASET_TAG: "fsdd4", tracking.DIGEST_TAG: "abc"}
    with tracking.start_run("tessera-fsdd4", "pipeline", tags=tags) as parent:
        with tracking.start_run("tessera-fsdd4", "train-ast", parent.run_id) as child:
            pass
    got = c.get_run(child.run_id).data.tags
    assert {k: got.get(k) for k in tags} == tags
