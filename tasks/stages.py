"""The pipeline's Prefect tasks, one per stage, in the order the DAG runs them:

    builtin-dataset -> ingest -> shard -> preprocess -> codebooks -> train (per model) -> evaluate (per model)
        -> roundtrips -> clip-index

This is the only module that knows Prefect tasks; the work is done by the packages below it (tasks/data, tasks/train,
tasks/eval, tasks/index), which take paths and configs and return small records.

Each stage is a `Stage`: its name and the code that does its work. From that one list come both the Prefect cache
key (tasks/infra/cache.py: task source + that code + content digests of the inputs) and the name of the output
folder (`Stage.out`: a digest of the same inputs and the same code), so a re-run with nothing changed is Cached and
finds its folder, and changing one model's parameters re-runs that model and what reads its checkpoint, nothing
else. Retries only where a failure can be transient (file I/O); bad items are quarantined, not retried. MLflow: every
task reports under the pipeline's parent run (`parent_run_id`, never part of a cache key).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task

import models
from tasks import index as index_lib
from tasks.data import codebook as codebook_lib
from tasks.data import features, loader
from tasks.data import ingest as ingest_lib
from tasks.data import preprocess as prep_lib
from tasks.data import shards as shard_lib
from tasks.data.builtin import speech, synthetic, vocab
from tasks.data.ingest import IngestConfig, Sources
from tasks.data.preprocess import PrepConfig
from tasks.data.shards import ShardConfig
from tasks.data.builtin.synthetic import SyntheticConfig
from tasks.eval import audio_out
from tasks.eval import evaluate as eval_lib
from tasks.eval import roundtrip as roundtrip_lib
from tasks.infra import storage, tracking
from tasks.infra.cache import content, path_digest
from tasks.infra.common import code_version, digest, read_success
from tasks.train import augment, batches, table
from tasks.train import trainer as train_lib


def transient_only(task, task_run, state) -> bool:
    """Retry I/O failures (a flaky disk or network store); bad input (a ValueError) fails at once with its message."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


IO_RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)


def stage(*code) -> dict:
    """Task options of a stage whose work is done by `code` (its cache key covers that code)."""
    return dict(cache_policy=content(*code), persist_result=True)


@dataclass(frozen=True)
class Stage:
    """A stage's name, its output folder under the root, and the modules/packages whose code does its work."""

    name: str
    folder: str
    code: tuple

    def task(self, io_retry: bool = False, **options):
        """Prefect's @task with this stage's name and cache policy (keyed on `code`)."""
        return task(name=self.name, **stage(*self.code), **(IO_RETRY if io_retry else {}), **options)

    def out(self, root: Path | str, *inputs, under: str = "") -> Path | str:
        """root/folder[/under]/<digest of inputs and code>: where these inputs' output goes (a folder or a URL)."""
        parts = [self.folder, *([under] if under else []), digest(*inputs, code_version(*self.code))]
        return storage.join(storage.location(root), *parts)


BUILTIN = Stage("builtin-dataset", "builtin", (synthetic, speech))
INGEST = Stage("ingest", "ingest", (ingest_lib,))
SHARD = Stage("shard", "shards", (shard_lib,))
PREPROCESS = Stage("preprocess", "prep", (prep_lib, features))
CODEBOOKS = Stage("codebooks", "codebooks", (codebook_lib, models.vq))
TRAIN = Stage("train", "train", (train_lib, table, batches, augment, loader, tracking, models))
EVALUATE = Stage("evaluate", "eval", (eval_lib, audio_out, loader, table, batches, vocab, models))
ROUNDTRIPS = Stage("roundtrips", "roundtrips", (roundtrip_lib, eval_lib, audio_out, loader, table, batches, vocab,
                                                models))
CLIP_INDEX = Stage("clip-index", "index", (index_lib, table, models))
STAGES = (BUILTIN, INGEST, SHARD, PREPROCESS, CODEBOOKS, TRAIN, EVALUATE, ROUNDTRIPS, CLIP_INDEX)


def _paths(paths: dict) -> dict:
    return {k: path_digest(Path(v)) for k, v in sorted(paths.items())}


# ---------------------------------------------------------------------------------------------------- data
@BUILTIN.task(io_retry=True)
def builtin_dataset(cfg: SyntheticConfig, root: Path) -> dict:
    """Generate the built-in synthetic dataset (images, captions, speech) in the layout users bring."""
    out = Path(BUILTIN.out(root, cfg))
    summary = synthetic.generate(cfg, out)
    return {"path": str(out), "counts": {k: v for k, v in summary.items() if isinstance(v, int)}}


def builtin_sources(dataset_dir: str | Path) -> Sources:
    d = Path(dataset_dir)
    return Sources(images=d / "images", audio=d / "audio", captions=d / "captions.csv", transcripts=d / "transcripts.csv")


@INGEST.task(io_retry=True)
def ingest(sources: Sources, cfg: IngestConfig, root: Path) -> dict:
    """Decode and validate every input once; quarantine what fails; write items.parquet."""
    out = Path(INGEST.out(root, ingest_lib.digest_sources(sources, cfg), cfg))
    res = ingest_lib.ingest(sources, cfg, out)
    return {"path": str(out), "items": str(res.items_path), "quarantine": str(res.quarantine_path),
            "n_items": dict(res.n_items), "n_quarantined": res.n_quarantined, "digest": res.digest}


@SHARD.task(io_retry=True)
def shard(items: Path | str, cfg: ShardConfig, root: Path | str) -> dict:
    """Write webdataset shards and the Parquet manifest (under `root`: a folder or an fsspec URL)."""
    items = storage.location(items)
    out = SHARD.out(root, path_digest(items), cfg)
    return {"path": str(out), **(read_success(out) or shard_lib.write_shards(items, cfg, out))}


@PREPROCESS.task(io_retry=True)
def preprocess(shards: Path | str, cfg: PrepConfig, root: Path | str) -> dict:
    """Model-ready spectrogram/image shards, normalisation stats and the patch sample set (under `root`)."""
    shards = storage.location(shards)
    out = PREPROCESS.out(root, path_digest(shards), cfg)
    return {"path": str(out), **(read_success(out) or prep_lib.preprocess(shards, cfg, out))}


# ---------------------------------------------------------------------------------------------------- models
@CODEBOOKS.task()
def fit_codebooks(prep: Path, cfg: codebook_lib.CodebookConfig, root: Path, parent_run_id: str | None = None,
                  experiment: str = "tessera") -> dict:
    """Fit the colour palette and the patch codebooks; log their quality and usage plots to MLflow."""
    out = Path(CODEBOOKS.out(root, path_digest(Path(prep)), cfg))
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


@TRAIN.task(tags=GPU_TAGS)
def train_model(model: str, prep: Path, codebooks: dict[str, Path], cfg: train_lib.TrainConfig, root: Path,
                preset: str = "default", overrides: dict | None = None, parent_run_id: str | None = None,
                experiment: str = "tessera", init_from: Path | None = None) -> dict:
    """Train one model (resuming from its checkpoint after a crash); register it in the MLflow Model Registry.

    init_from: a trained checkpoint that starts part of the model (table `init`: CLIP's image tower from the ViT)."""
    out = Path(TRAIN.out(root, model, path_digest(Path(prep)), _paths(codebooks), cfg, preset, overrides or {},
                         *([path_digest(Path(init_from))] if init_from else []), under=model))
    return train_lib.train(model, Path(prep), out, cfg, model_overrides=overrides,
                           codebooks={k: str(v) for k, v in codebooks.items()}, parent_run_id=parent_run_id,
                           experiment=experiment, preset=preset, register=True, init_from=init_from)


@EVALUATE.task()
def evaluate_model(model: str, checkpoint: Path, prep: Path, codebooks: dict[str, Path], root: Path,
                   max_samples: int | None = None, run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Evaluate one trained model on the test split; metrics and plots go to its training run in MLflow."""
    out = Path(EVALUATE.out(root, model, path_digest(Path(checkpoint)), path_digest(Path(prep)), max_samples,
                              under=model))
    result = eval_lib.evaluate(model, Path(checkpoint), Path(prep), out, vocab=vocab.BUILTIN,
                               codebooks={k: str(v) for k, v in codebooks.items()}, max_samples=max_samples)
    if run_id:
        with tracking.start_run(experiment, "", run_id=run_id) as run:
            run.metrics.add({f"test/{k}": v for k, v in result["metrics"].items()}, step=0)
            run.metrics.flush()
            run.client.log_artifacts(run.run_id, str(out), artifact_path="test")
    return {"path": str(out), "metrics": result["metrics"], "summary": result.get("summary", "")}


@ROUNDTRIPS.task()
def roundtrips(checkpoints: dict[str, Path], prep: Path, codebooks: dict[str, Path], root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Across modalities: text-to-image samples classified by ViT/CLIP, text-to-speech transcribed by ASR.

    checkpoints: {model name: checkpoint}; each model plays the round-trip role its table entry names."""
    out = Path(ROUNDTRIPS.out(root, _paths(checkpoints), path_digest(Path(prep))))
    by_role = {table.MODELS[m].role: Path(c) for m, c in checkpoints.items() if table.MODELS[m].role}
    metrics = {}
    with tracking.start_run(experiment, "roundtrips", parent_run_id) as run:
        for name, trip in roundtrip_lib.ROUND_TRIPS.items():
            if set(trip.roles) <= set(by_role):
                r = trip.run(by_role, Path(prep), {k: str(v) for k, v in codebooks.items()}, out / name, vocab.BUILTIN)
                metrics.update({f"{name}/{k}": v for k, v in r["metrics"].items()})
        run.metrics.add(metrics, step=0)
        run.metrics.flush()
        if out.exists():
            run.client.log_artifacts(run.run_id, str(out), artifact_path="roundtrips")
    return {"path": str(out), "metrics": metrics}


@CLIP_INDEX.task(io_retry=True)
def clip_index(prep: Path, checkpoint: Path, cfg: index_lib.IndexConfig, root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Embed every image and caption with the trained CLIP and build the faiss index (with its provenance)."""
    out = Path(CLIP_INDEX.out(root, path_digest(Path(prep)), path_digest(Path(checkpoint)), cfg))
    record = read_success(out)
    if record is None:
        record = index_lib.build_index(Path(prep), Path(checkpoint), out, cfg)
        with tracking.start_run(experiment, "clip-index", parent_run_id) as run:
            run.log_params({f"index.{k}": v for k, v in asdict(cfg).items()})
            run.metrics.add({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, 0)
            run.client.log_artifacts(run.run_id, str(out), artifact_path="index")
    return {"path": str(out), **{k: v for k, v in record.items() if not isinstance(v, dict)}}
