"""The MLflow Model Registry: one registered model per dataset and model, `tessera-<dataset>-<model>`.

A pipeline registers after every model has trained and been evaluated (a pipeline that fails registers nothing):
one version per trained checkpoint, holding the validation-best checkpoint that evaluation read, tagged with the
dataset's name and digest, the preset, the steps and the headline test metrics, and described in a sentence.
Registering the same checkpoint again (a cached re-run) finds its version instead of adding one.

The newest version is `models:/tessera-<dataset>-<model>/latest` (MLflow resolves it, and reserves `latest` as an
alias name); the alias `champion` is on the best by validation (the model table's `monitor`: val accuracy for the
classifiers, ties broken by the lower val loss; else the lower val loss) among the versions that are eligible:
trained with a non-tiny preset and run to their planned budget (all planned steps, stopped early on validation, or
a whole schedule the time cap shortened: TrainConfig.max_minutes). Load one with
`mlflow.pytorch.load_model("models:/tessera-fsdd4-ast@champion")`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tasks.data import loader
from tasks.data.shards import shard_urls
from tasks.eval.evaluate import load_model
from tasks.infra import tracking
from tasks.infra.common import file_sha256
from tasks.train.table import spec

CHAMPION = "champion"
CKPT_TAG, ELIGIBLE_TAG, SCORE_TAG = "tessera.checkpoint_sha256", "tessera.eligible", "tessera.val_score"


@dataclass(frozen=True)
class Registration:
    """What every version of one pipeline run is tagged with."""

    dataset: str
    digest: str
    preset: str


def registered_name(dataset: str, model: str) -> str:
    return f"tessera-{dataset}-{model}"


def val_score(model: str, val: dict[str, float]) -> list[float] | None:
    """The model's validation result as a key where larger is better (model table `monitor`: val accuracy, ties
    broken by the lower val loss, or the lower val loss); None without a val split."""
    return list(spec(model).score(val)) if val else None


def eligible(record: dict, preset: str) -> bool:
    """A champion candidate: a non-tiny preset, trained to its planned budget (or stopped early on validation, or to
    the end of a schedule the time cap moved)."""
    ran = (record["steps"] >= record.get("planned_steps", record["steps"]) or bool(record.get("stopped_early"))
           or bool(record.get("time_capped")))
    return preset != "tiny" and ran


class _OneInput(nn.Module):
    """Positional adapter for export: forward(x) -> model({key: x})[0] (our models take a batch dict)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x):
        return self.model({self.keys[0]: x})[0]


class _TwoInputs(_OneInput):
    def forward(self, x, y):
        return self.model({self.keys[0]: x, self.keys[1]: y})[0]


def log_model(model: nn.Module, name: str, registered_name: str | None, run_id: str,
              example: dict[str, torch.Tensor]) -> dict:
    """Log a model as an MLflow 3 LoggedModel of run `run_id` and register it in the Model Registry.

    MLflow 3 takes `name=` (`artifact_path=` is deprecated) and saves PyTorch models as a `torch.export` program
    ("pt2") by default, which loads without unpickling code. Export needs positional tensors, so the model is
    wrapped to take the `example` batch's tensors in order (e.g. image; or src, tgt) and return the model's output;
    the signature is inferred from the example (batch dimension dynamic: give at least two rows). Requirements are
    given, not inferred (inference re-imports the model in a subprocess, which is slow).
    Returns {"model_uri", "registered_name", "version"}.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    keys = list(example)
    if len(keys) not in (1, 2):
        raise ValueError(f"log_model takes a one- or two-tensor example batch, got keys {keys}")
    wrapped = (_OneInput if len(keys) == 1 else _TwoInputs)(model.eval(), keys)
    tensors = tuple(example[k].cpu() for k in keys)
    with torch.no_grad():
        output = wrapped(*tensors)
    signature = infer_signature({k: t.numpy() for k, t in zip(keys, tensors)}, output.float().numpy())
    c = tracking.client()
    # the LoggedModel belongs in the run's experiment (log_model alone puts it in the fluent active experiment,
    # "Default", with its artifacts under the working directory)
    logged = c.create_logged_model(c.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id)
    with tracking.tracking_env():
        info = mlflow.pytorch.log_model(
            wrapped,
            name=name,
            model_id=logged.model_id,
            registered_model_name=registered_name,
            run_id=run_id,
            input_example=tuple(t.numpy() for t in tensors),
            signature=signature,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return {"model_uri": info.model_uri, "registered_name": registered_name,
            "version": getattr(info, "registered_model_version", None)}


def _example(model_name: str, model, ctx, prep: Path) -> dict:
    """Two samples of the val split (else train) as the model's input tensors: the logged model's signature."""
    s = spec(model_name)
    urls = (shard_urls(prep, s.modality, "val", allow_empty=True)
            or shard_urls(prep, s.modality, "train"))
    samples = next(iter(loader.batches(urls, 2, train=False, split_nodes=False)))
    batch = s.make_batch(samples, ctx)
    return {k: batch[k] for k in s.inputs}


def _existing(c, name: str, checkpoint_sha: str) -> str | None:
    """The version already registered for this checkpoint, if any."""
    for v in c.search_model_versions(f"name='{name}'"):
        if v.tags.get(CKPT_TAG) == checkpoint_sha:
            return str(v.version)
    return None


def _describe(model: str, reg: Registration, record: dict, test: dict, head: list[str]) -> str:
    shown = ", ".join(f"test {k} {test[k]:.4g}" for k in head)
    val = ", ".join(f"{k} {v:.4g}" for k, v in sorted((record.get("best_val") or record.get("metrics") or {}).items()))
    best = f"the validation-best checkpoint of step {record['best_step']}" if record.get("best_step") else \
        "its final checkpoint"
    return (f"{model} trained on dataset {reg.dataset} (digest {reg.digest[:12]}), preset {reg.preset}, "
            f"{record['steps']} steps; {best}. {shown or 'no test metrics'}; {val or 'no val split'}.")


def _tags(model: str, reg: Registration, record: dict, test: dict, head: list[str], sha: str) -> dict[str, str]:
    val = record.get("best_val") or record.get("metrics") or {}
    score = val_score(model, val)
    tags = {"tessera.model": model, tracking.DATASET_TAG: reg.dataset, tracking.DIGEST_TAG: reg.digest,
            "tessera.preset": reg.preset, "tessera.steps": record["steps"], CKPT_TAG: sha,
            ELIGIBLE_TAG: str(eligible(record, reg.preset)).lower(), "tessera.run_id": record["run_id"],
            **{f"test.{k}": f"{test[k]:.6g}" for k in head},
            **{k.replace("/", "."): f"{v:.6g}" for k, v in val.items()}}
    if score is not None:
        tags[SCORE_TAG] = json.dumps(score)
    return {k: str(v) for k, v in tags.items()}


def champion(c, name: str) -> str | None:
    """The eligible version with the best validation score (the newest among equals), or None."""
    best: tuple | None = None
    for v in c.search_model_versions(f"name='{name}'"):
        if v.tags.get(ELIGIBLE_TAG) == "true" and SCORE_TAG in v.tags:
            key = (*json.loads(v.tags[SCORE_TAG]), int(v.version))
            best = key if best is None or key > best else best
    return None if best is None else str(best[-1])


def register(model: str, record: dict, test: dict, prep: Path, codebooks: dict[str, str],
             reg: Registration) -> dict:
    """Register `record`'s checkpoint (a trainer record: checkpoint, run_id, steps, best_val...) with its test
    metrics `test`; move `champion` to the best eligible version.
    Returns {"registered_name", "version", "champion", "new"}."""
    c = tracking.client()
    name = registered_name(reg.dataset, model)
    sha = file_sha256(record["checkpoint"])
    version = _existing(c, name, sha)
    new = version is None
    if new:
        _, net, ctx = load_model(Path(record["checkpoint"]), prep, codebooks, expect=model)
        logged = log_model(net, "model", name, record["run_id"], _example(model, net, ctx, prep))
        version = str(logged["version"])
    head = [k for k in spec(model).headline if k in test]
    for k, v in _tags(model, reg, record, test, head, sha).items():
        c.set_model_version_tag(name, version, k, v)
    c.update_model_version(name, version, description=_describe(model, reg, record, test, head))
    best = champion(c, name)
    if best is not None:
        c.set_registered_model_alias(name, CHAMPION, best)
    return {"registered_name": name, "version": version, "champion": best, "new": new}
