"""Prefect tasks of the model stages: codebooks -> train (per model) -> evaluate -> CLIP index.

Like tasks/data.py: each task names its output folder by a digest of its inputs' content and its config, and the
project's cache policy (tasks/cache.py) keys on the same, so a re-run with nothing changed is Cached, and changing
one model's parameters re-runs that model and what reads its checkpoint, nothing else. MLflow: every task reports
under the pipeline's parent run (`parent_run_id`, never part of a cache key).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from prefect import task

import models
import tasks.audio_out
import tasks.loader
from tasks import augment
from tasks import codebook as codebook_lib
from tasks import evaluate as eval_lib
from tasks import index as index_lib
from tasks import registry
from tasks import roundtrip as roundtrip_lib
from tasks import train as train_lib
from tasks import tracking
from tasks.cache import path_digest
from tasks.common import code_version, digest, read_success
from tasks.data import IO_RETRY, stage



@task(name="codebooks", **stage(codebook_lib, models))
def fit_codebooks(prep: Path, cfg: codebook_lib.CodebookConfig, root: Path, parent_run_id: str | None = None,
                  experiment: str = "tessera") -> dict:
    """Fit the colour palette and the patch codebooks; log their quality and usage plots to MLflow."""
    out = Path(root) / "codebooks" / digest(path_digest(Path(prep)), cfg, code_version(codebook_lib, models.vq))
    record = read_success(out)
    if record is None:
        with tracking.start_run(experiment, "codebooks", parent_run_id) as run:
            record = codebook_lib.fit_codebooks(Path(prep), cfg, out)
            run.log_params(asdict(cfg))
            run.metrics.add({f"{kind}/{k}": v for kind, m in record["metrics"].items() for k, v in m.items()}, step=0)
            run.metrics.flush()
            run.client.log_artifacts(run.run_id, str(out), artifact_path="codebooks")
    return {"path": str(out), **{kind: str(out / f) for kind, f in record["codebooks"].items()},
            "metrics": record["metrics"]}


# Task runs tagged `tessera-train` share a Prefect concurrency limit when a server has one (`tessera deploy` creates
# it, one slot per GPU): two trainings never fight for one GPU. Without a limit (local/ephemeral runs) the tag is inert.
# Under torchrun (WORLD_SIZE > 1) every rank runs this task and the ranks wait for each other: queueing them for slots
# one by one would deadlock (rank 0 holds the slot, waiting for rank 1), so torchrun jobs are not counted.
GPU_TAGS = [] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["tessera-train"]


@task(name="train", tags=GPU_TAGS, **stage(train_lib, registry, augment, tasks.loader, tracking, models))
def train_model(model: str, prep: Path, codebooks: dict[str, Path], cfg: train_lib.TrainConfig, root: Path,
                preset: str = "default", overrides: dict | None = None, parent_run_id: str | None = None,
                experiment: str = "tessera", init_from: Path | None = None) -> dict:
    """Train one model (resuming from its checkpoint after a crash); register it in the MLflow Model Registry.

    init_from: a trained checkpoint that starts part of the model (registry `init`: CLIP's image tower from the ViT)."""
    key = digest(model, path_digest(Path(prep)), {k: path_digest(Path(v)) for k, v in sorted(codebooks.items())},
                 cfg, preset, overrides or {}, code_version(train_lib, registry, augment, models),
                 *([path_digest(Path(init_from))] if init_from else []))
    out = Path(root) / "train" / model / key
    return train_lib.train(model, Path(prep), out, cfg, model_overrides=overrides,
                           codebooks={k: str(v) for k, v in codebooks.items()}, parent_run_id=parent_run_id,
                           experiment=experiment, preset=preset, register=True, init_from=init_from)


@task(name="evaluate", **stage(eval_lib, tasks.audio_out, tasks.loader, registry, models))
def evaluate_model(model: str, checkpoint: Path, prep: Path, codebooks: dict[str, Path], root: Path,
                   max_samples: int | None = None, run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Evaluate one trained model on the test split; metrics and plots go to its training run in MLflow."""
    key = digest(model, path_digest(Path(checkpoint)), path_digest(Path(prep)), max_samples, code_version(eval_lib))
    out = Path(root) / "eval" / model / key
    result = eval_lib.evaluate(model, Path(checkpoint), Path(prep), out,
                               codebooks={k: str(v) for k, v in codebooks.items()}, max_samples=max_samples)
    if run_id:
        _report(experiment, run_id, result, out, prefix="test")
    return {"path": str(out), "metrics": result["metrics"], "summary": result.get("summary", "")}


def _report(experiment: str, run_id: str, result: dict, out: Path, prefix: str) -> None:
    with tracking.start_run(experiment, "", run_id=run_id) as run:
        run.metrics.add({f"{prefix}/{k}": v for k, v in result["metrics"].items()}, step=0)
        run.metrics.flush()
        run.client.log_artifacts(run.run_id, str(out), artifact_path=prefix)


ROUNDTRIP_MODELS = ("t2i", "vit", "clip", "tts", "asr")


@task(name="roundtrips", **stage(roundtrip_lib, eval_lib, tasks.audio_out, tasks.loader, registry, models))
def roundtrips(checkpoints: dict[str, Path], prep: Path, codebooks: dict[str, Path], root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Across modalities: text-to-image samples classified by ViT/CLIP, text-to-speech transcribed by ASR."""
    key = digest({k: path_digest(Path(v)) for k, v in sorted(checkpoints.items())}, path_digest(Path(prep)),
                 code_version(roundtrip_lib, eval_lib))
    out = Path(root) / "roundtrips" / key
    cbs = {k: str(v) for k, v in codebooks.items()}
    metrics: dict = {}
    with tracking.start_run(experiment, "roundtrips", parent_run_id) as run:
        if {"t2i", "vit", "clip"} <= set(checkpoints):
            r = roundtrip_lib.roundtrip_t2i(checkpoints["t2i"], checkpoints["vit"], checkpoints["clip"], Path(prep), cbs,
                                       out / "t2i")
            metrics.update({f"t2i/{k}": v for k, v in r["metrics"].items()})
        if {"tts", "asr"} <= set(checkpoints):
            r = roundtrip_lib.roundtrip_tts(checkpoints["tts"], checkpoints["asr"], Path(prep), cbs, out / "tts")
            metrics.update({f"tts/{k}": v for k, v in r["metrics"].items()})
        run.metrics.add(metrics, step=0)
        run.metrics.flush()
        if out.exists():
            run.client.log_artifacts(run.run_id, str(out), artifact_path="roundtrips")
    return {"path": str(out), "metrics": metrics}


@task(name="clip-index", **IO_RETRY, **stage(index_lib, models))
def clip_index(prep: Path, checkpoint: Path, cfg: index_lib.IndexConfig, root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Embed every image and caption with the trained CLIP and build the faiss index (with its provenance)."""
    out = index_lib.index_dir(Path(root), Path(prep), Path(checkpoint), cfg)
    record = read_success(out)
    if record is None:
        record = index_lib.build_index(Path(prep), Path(checkpoint), out, cfg)
        with tracking.start_run(experiment, "clip-index", parent_run_id) as run:
            run.log_params({f"index.{k}": v for k, v in asdict(cfg).items()})
            run.metrics.add({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, 0)
            run.client.log_artifacts(run.run_id, str(out), artifact_path="index")
    return {"path": str(out), **{k: v for k, v in record.items() if not isinstance(v, dict)}}
