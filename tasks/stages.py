"""The pipeline's Prefect tasks, one per stage, in the order the DAG runs them:

    builtin-dataset -> ingest -> shard -> preprocess -> codebooks -> train (per model) -> evaluate (per model)
        -> roundtrips -> clip-index -> register (per model)

This is the only module that knows Prefect tasks; the work is done by the packages below it (tasks/data, tasks/train,
tasks/eval, tasks/index), which take paths and configs and return small records.

Each stage is a `Stage`: its name and the code that does its work. From that one list come both the Prefect cache
key (tasks/infra/cache.py: task source + that code + content digests of the inputs) and the name of the output
folder (`Stage.out`: a digest of the same inputs and the same code), so a re-run with nothing changed is Cached and
finds its folder, and changing one model's parameters re-runs that model and what reads its checkpoint, nothing
else. Retries only where a failure can be transient (file I/O); bad items are quarantined, not retried. MLflow: every
task reports under the pipeline's parent run (`parent_run_id`, never part of a cache key).

Each task names its output folder in one function of its inputs (`_<stage>_out`), which both the task body and the
cache policy call: a Cached record whose folder was deleted (or never finished) is not a hit, the stage runs again.
A task holds its folder's lock (`output_lock`) while it reuses or builds it, so two runs on one root build each
output once. Records are plain JSON (`plain`), stored by Prefect as JSON: a cached re-run reads back the same record.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.serializers import JSONSerializer

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
from tasks.eval import audio_out, generate
from tasks.eval import evaluate as eval_lib
from tasks.eval import registry
from tasks.eval import roundtrip as roundtrip_lib
from tasks.infra import metric_buffer, storage, tracking, tracking_store
from tasks.infra.cache import content, path_digest
from tasks.infra.common import atomic_dir, code_version, digest, output_lock, plain, read_success
import tasks.train
from tasks.train import batches, table
from tasks.train import trainer as train_lib


def transient_only(task, task_run, state) -> bool:
    """Retry I/O failures (a flaky disk or network store); bad input (a ValueError) fails at once with its message."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


IO_RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
# Task results (the records below) as plain JSON: no pickle in the result folder, and no class names that reading a
# record would import (Prefect's default JSON object hooks do); a value JSON cannot hold fails the task loudly.
RECORDS = JSONSerializer(object_encoder=None, object_decoder=None)


def stage(*code, where: Callable[..., Path | str] | None = None) -> dict:
    """Task options of a stage whose work is done by `code` (its cache key covers that code) and whose output folder
    `where(**inputs)` names (a record whose folder is gone or unfinished is not a cache hit)."""
    return dict(cache_policy=content(*code, output=_keyed(where) if where else None), persist_result=True,
                result_serializer=RECORDS)


@dataclass(frozen=True)
class Stage:
    """A stage's name, its output folder under the root, and the modules/packages whose code does its work."""

    name: str
    folder: str
    code: tuple

    def task(self, where: Callable[..., Path | str] | None = None, io_retry: bool = False, **options):
        """Prefect's @task with this stage's name and cache policy (keyed on `code` and on the output folder `where`
        names from the task's inputs)."""
        return task(name=self.name, **stage(*self.code, where=where), **(IO_RETRY if io_retry else {}), **options)

    def out(self, root: Path | str, *inputs, under: str = "") -> Path | str:
        """root/folder[/under]/<digest of inputs and code>: where these inputs' output goes (a folder or a URL)."""
        parts = [self.folder, *([under] if under else []), digest(*inputs, code_version(*self.code))]
        return storage.join(storage.location(root), *parts)


BUILTIN = Stage("builtin-dataset", "builtin", (synthetic, speech))
INGEST = Stage("ingest", "ingest", (ingest_lib,))
SHARD = Stage("shard", "shards", (shard_lib,))
PREPROCESS = Stage("preprocess", "prep", (prep_lib, features))
CODEBOOKS = Stage("codebooks", "codebooks", (codebook_lib, models.vq))
# tasks.train: every module of tasks/train; tracking with the two modules it uses (its store, its metric buffer)
TRAIN = Stage("train", "train", (tasks.train, loader, tracking, tracking_store, metric_buffer, models))
EVALUATE = Stage("evaluate", "eval", (eval_lib, generate, audio_out, loader, table, batches, vocab, models))
ROUNDTRIPS = Stage("roundtrips", "roundtrips", (roundtrip_lib, eval_lib, generate, audio_out, loader, table, batches,
                                                vocab, synthetic, models))
CLIP_INDEX = Stage("clip-index", "index", (index_lib, table, models))
STAGES = (BUILTIN, INGEST, SHARD, PREPROCESS, CODEBOOKS, TRAIN, EVALUATE, ROUNDTRIPS, CLIP_INDEX)

# The output folder a stage's cache policy worked out for a task run, kept for that run's body, which needs the same
# folder: the inputs are digested once, not twice (ingest's folder digests every source file). Bounded, since the
# body of a cached run never comes to take its entry.
_OUTPUTS: dict[tuple, Path | str] = {}
_OUTPUTS_LOCK = threading.Lock()


def _task_run():
    ctx = TaskRunContext.get()
    return ctx.task_run.id if ctx and ctx.task_run else None


def _keyed(where: Callable[..., Path | str]) -> Callable[..., Path | str]:
    """`where` as the cache policy calls it (with the task's inputs): it keeps the answer for the task body."""

    def output(**inputs) -> Path | str:
        out = where(**inputs)
        if (run := _task_run()) is not None:
            with _OUTPUTS_LOCK:
                _OUTPUTS[(run, where)] = out
                while len(_OUTPUTS) > 256:
                    _OUTPUTS.pop(next(iter(_OUTPUTS)))
        return out

    return output


def _output(where: Callable[..., Path | str], **inputs) -> Path | str:
    """A task body's output folder: the one its cache policy worked out in this task run, else `where(**inputs)`."""
    with _OUTPUTS_LOCK:
        found = _OUTPUTS.pop((_task_run(), where), None)
    return found if found is not None else where(**inputs)


def _paths(paths: dict) -> dict:
    return {k: path_digest(Path(v)) for k, v in sorted(paths.items())}


# ---------------------------------------------------------------------------------------------------- data
def _builtin_out(cfg: SyntheticConfig, root: Path, **_) -> Path:
    return Path(BUILTIN.out(root, cfg))


@BUILTIN.task(_builtin_out, io_retry=True)
def builtin_dataset(cfg: SyntheticConfig, root: Path) -> dict:
    """Generate the built-in synthetic dataset (images, captions, speech) in the layout users bring."""
    out = _output(_builtin_out, cfg=cfg, root=root)
    with output_lock(out):
        summary = synthetic.generate(cfg, out)
    return plain({"path": str(out), "counts": {k: v for k, v in summary.items() if isinstance(v, int)}})


def builtin_sources(dataset_dir: str | Path) -> Sources:
    d = Path(dataset_dir)
    return Sources(images=d / "images", audio=d / "audio", captions=d / "captions.csv", transcripts=d / "transcripts.csv")


def _ingest_out(sources: Sources, cfg: IngestConfig, root: Path, **_) -> Path:
    return Path(INGEST.out(root, ingest_lib.digest_sources(sources, cfg), cfg))


@INGEST.task(_ingest_out, io_retry=True)
def ingest(sources: Sources, cfg: IngestConfig, root: Path) -> dict:
    """Decode and validate every input once; quarantine what fails; write items.parquet."""
    out = _output(_ingest_out, sources=sources, cfg=cfg, root=root)
    with output_lock(out):
        res = ingest_lib.ingest(sources, cfg, out)
    return plain({"path": str(out), "items": str(res.items_path), "quarantine": str(res.quarantine_path),
                  "n_items": dict(res.n_items), "n_quarantined": res.n_quarantined, "digest": res.digest,
                  "reasons": dict(res.reasons), "skipped": dict(res.skipped), "changes": dict(res.changes)})


def _shard_out(items: Path | str, cfg: ShardConfig, root: Path | str, **_) -> Path | str:
    return SHARD.out(root, path_digest(storage.location(items)), cfg)


@SHARD.task(_shard_out, io_retry=True)
def shard(items: Path | str, cfg: ShardConfig, root: Path | str) -> dict:
    """Write webdataset shards and the Parquet manifest (under `root`: a folder or an fsspec URL)."""
    out = _output(_shard_out, items=items, cfg=cfg, root=root)
    with output_lock(out):
        record = read_success(out) or shard_lib.write_shards(storage.location(items), cfg, out)
    return plain({"path": str(out), **record})


def _prep_out(shards: Path | str, cfg: PrepConfig, root: Path | str, **_) -> Path | str:
    return PREPROCESS.out(root, path_digest(storage.location(shards)), cfg)


@PREPROCESS.task(_prep_out, io_retry=True)
def preprocess(shards: Path | str, cfg: PrepConfig, root: Path | str) -> dict:
    """Model-ready spectrogram/image shards, normalisation stats and the patch sample set (under `root`)."""
    out = _output(_prep_out, shards=shards, cfg=cfg, root=root)
    with output_lock(out):
        record = read_success(out) or prep_lib.preprocess(storage.location(shards), cfg, out)
    return plain({"path": str(out), **record})


# ---------------------------------------------------------------------------------------------------- models
def _codebooks_out(prep: Path, cfg: codebook_lib.CodebookConfig, root: Path, **_) -> Path:
    return Path(CODEBOOKS.out(root, path_digest(Path(prep)), cfg))


@CODEBOOKS.task(_codebooks_out)
def fit_codebooks(prep: Path, cfg: codebook_lib.CodebookConfig, root: Path, parent_run_id: str | None = None,
                  experiment: str = "tessera") -> dict:
    """Fit the colour palette and the patch codebooks; log their quality and usage plots to MLflow."""
    out = _output(_codebooks_out, prep=prep, cfg=cfg, root=root)
    with output_lock(out):
        record = read_success(out)
        if record is None:
            with tracking.start_run(experiment, "codebooks", parent_run_id) as run:
                record = codebook_lib.fit_codebooks(Path(prep), cfg, out)
                run.log_params(asdict(cfg))
                run.metrics.add({f"{kind}/{k}": v for kind, m in record["metrics"].items() for k, v in m.items()},
                                step=0)
                run.metrics.flush()
                run.client.log_artifacts(run.run_id, str(out), artifact_path="codebooks")
    return plain({"path": str(out), **{kind: str(out / f) for kind, f in record["codebooks"].items()},
                  "metrics": record["metrics"]})


# Task runs tagged `tessera-train` share a Prefect concurrency limit when a server has one (`tessera deploy` creates
# it, one slot per GPU): two trainings never fight for one GPU. Without a limit (local/ephemeral runs) the tag is inert.
# Under torchrun (WORLD_SIZE > 1) every rank runs this task and the ranks wait for each other: queueing them for slots
# one by one would deadlock (rank 0 holds the slot, waiting for rank 1), so torchrun jobs are not counted; for the
# same reason their ranks do not take the output folder's lock either (the launcher starts one job per output).
DISTRIBUTED = int(os.environ.get("WORLD_SIZE", "1")) > 1
GPU_TAGS = [] if DISTRIBUTED else ["tessera-train"]


def _train_out(model: str, prep: Path, codebooks: dict[str, Path], cfg: train_lib.TrainConfig, root: Path,
               preset: str = "default", overrides: dict | None = None, init_from: Path | None = None, **_) -> Path:
    return Path(TRAIN.out(root, model, path_digest(Path(prep)), _paths(codebooks), cfg, preset, overrides or {},
                          *([path_digest(Path(init_from))] if init_from else []), under=model))


@TRAIN.task(_train_out, tags=GPU_TAGS)
def train_model(model: str, prep: Path, codebooks: dict[str, Path], cfg: train_lib.TrainConfig, root: Path,
                preset: str = "default", overrides: dict | None = None, parent_run_id: str | None = None,
                experiment: str = "tessera", init_from: Path | None = None) -> dict:
    """Train one model (resuming from its checkpoint after a crash); `register_model` registers it once evaluated.

    init_from: a trained checkpoint that starts part of the model (table `init`: CLIP's image tower from the ViT)."""
    out = _output(_train_out, model=model, prep=prep, codebooks=codebooks, cfg=cfg, root=root, preset=preset,
                  overrides=overrides, init_from=init_from)
    with contextlib.nullcontext() if DISTRIBUTED else output_lock(out):
        record = train_lib.train(model, Path(prep), out, cfg, model_overrides=overrides,
                                 codebooks={k: str(v) for k, v in codebooks.items()}, parent_run_id=parent_run_id,
                                 experiment=experiment, preset=preset, init_from=init_from)
    return plain(record)


def _eval_out(model: str, checkpoint: Path, prep: Path, root: Path, max_samples: int | None = None,
              builtin: bool = True, split: str = "test", **_) -> Path:
    return Path(EVALUATE.out(root, model, path_digest(Path(checkpoint)), path_digest(Path(prep)), max_samples,
                             builtin, split, under=model))


def _evaluated(out: Path) -> dict | None:
    """A finished evaluation folder's result (its `_SUCCESS` record and summary.md), or None."""
    record = read_success(out)
    if record is None:
        return None
    return {**record, "summary": (out / "summary.md").read_text() if (out / "summary.md").is_file() else ""}


@EVALUATE.task(_eval_out)
def evaluate_model(model: str, checkpoint: Path, prep: Path, codebooks: dict[str, Path], root: Path,
                   max_samples: int | None = None, run_id: str | None = None, experiment: str = "tessera",
                   builtin: bool = True, split: str = "test") -> dict:
    """Evaluate one trained model on a test set (`test` or a `test_<name>` split); metrics (`<split>/<name>`) and
    plots (artifacts under `<split>/`) go to its training run in MLflow.

    builtin: the data is the built-in set, so its vocabulary's metrics (shape/colour zero-shot, held-out pairs)
    apply; on other data zero-shot runs on the data's own class names."""
    out = _output(_eval_out, model=model, checkpoint=checkpoint, prep=prep, root=root, max_samples=max_samples,
                  builtin=builtin, split=split)
    with output_lock(out):
        result = _evaluated(out) or eval_lib.evaluate(
            model, Path(checkpoint), Path(prep), out, vocab=vocab.BUILTIN if builtin else None,
            codebooks={k: str(v) for k, v in codebooks.items()}, split=split, max_samples=max_samples)
    if run_id:
        with tracking.start_run(experiment, "", run_id=run_id) as run:
            run.metrics.add({f"{split}/{k}": v for k, v in result["metrics"].items()}, step=0)
            run.metrics.flush()
            run.client.log_artifacts(run.run_id, str(out), artifact_path=split)
    return plain({"path": str(out), "split": split, "metrics": result["metrics"],
                  "summary": result.get("summary", "")})


def _roundtrips_out(checkpoints: dict[str, Path], prep: Path, root: Path, builtin: bool = True, **_) -> Path:
    return Path(ROUNDTRIPS.out(root, _paths(checkpoints), path_digest(Path(prep)), builtin))


@ROUNDTRIPS.task(_roundtrips_out)
def roundtrips(checkpoints: dict[str, Path], prep: Path, codebooks: dict[str, Path], root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera", builtin: bool = True) -> dict:
    """Across modalities: text-to-image samples judged by the ViT (shape) and their pixels (colour), ImageGPT's samples
    and completions by the ViT, text-to-speech transcribed by ASR; grids, WAVs and spectrograms are logged to the
    round-trip run's artifacts (`roundtrips/<trip>/`, linked from each summary.md).

    checkpoints: {model name: checkpoint}; each model plays the round-trip role its table entry names. A round trip
    that judges by the built-in vocabulary (text-to-image: are the asked shape and colour drawn?) runs only on the
    built-in set (builtin)."""
    out = _output(_roundtrips_out, checkpoints=checkpoints, prep=prep, root=root, builtin=builtin)
    with output_lock(out):
        record = read_success(out)
        if record is None:
            record = _run_roundtrips(out, checkpoints, Path(prep), codebooks, parent_run_id, experiment,
                                     vocab.BUILTIN if builtin else None)
    return plain({"path": str(out), "metrics": record["metrics"]})


def _run_roundtrips(out: Path, checkpoints: dict[str, Path], prep: Path, codebooks: dict[str, Path],
                    parent_run_id: str | None, experiment: str, vocabulary: vocab.Vocabulary | None) -> dict:
    """Every round trip whose roles the checkpoints fill, each into out/<name>; `_SUCCESS` holds their metrics."""
    by_role = {table.MODELS[m].role: Path(c) for m, c in checkpoints.items() if table.MODELS[m].role}
    record: dict = {"metrics": {}}
    with tracking.start_run(experiment, "roundtrips", parent_run_id) as run:
        with atomic_dir(out, record) as tmp:
            for name, trip in roundtrip_lib.ROUND_TRIPS.items():
                if set(trip.roles) <= set(by_role) and (vocabulary or not trip.needs_vocab):
                    r = trip.run(by_role, prep, {k: str(v) for k, v in codebooks.items()}, tmp / name, vocabulary)
                    record["metrics"].update({f"{name}/{k}": v for k, v in r["metrics"].items()})
                    record.setdefault("trips", []).append(name)
            (tmp / "summary.md").write_text("".join(f"- [{n}]({n}/summary.md): grids, WAVs and spectrograms beside "
                                                    "it\n" for n in record.get("trips", [])))
        run.metrics.add(record["metrics"], step=0)
        run.metrics.flush()
        if record["metrics"]:
            run.client.log_artifacts(run.run_id, str(out), artifact_path="roundtrips")
    return record


def _index_out(prep: Path, checkpoint: Path, cfg: index_lib.IndexConfig, root: Path, **_) -> Path:
    return Path(CLIP_INDEX.out(root, path_digest(Path(prep)), path_digest(Path(checkpoint)), cfg))


@CLIP_INDEX.task(_index_out, io_retry=True)
def clip_index(prep: Path, checkpoint: Path, cfg: index_lib.IndexConfig, root: Path,
               parent_run_id: str | None = None, experiment: str = "tessera") -> dict:
    """Embed every image and caption with the trained CLIP and build the faiss index (with its provenance)."""
    out = _output(_index_out, prep=prep, checkpoint=checkpoint, cfg=cfg, root=root)
    with output_lock(out):
        record = read_success(out)
        if record is None:
            record = index_lib.build_index(Path(prep), Path(checkpoint), out, cfg)
            with tracking.start_run(experiment, "clip-index", parent_run_id) as run:
                run.log_params({f"index.{k}": v for k, v in asdict(cfg).items()})
                run.metrics.add({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None},
                                0)
                run.client.log_artifacts(run.run_id, str(out), artifact_path="index")
    return plain({"path": str(out), **{k: v for k, v in record.items() if not isinstance(v, dict)}})


# ---------------------------------------------------------------------------------------------------- registry
@task(name="register", cache_policy=NO_CACHE, result_serializer=RECORDS, retries=2, retry_delay_seconds=2,
      retry_condition_fn=transient_only)
def register_model(model: str, record: dict, test: dict, prep: Path, codebooks: dict[str, Path],
                   reg: registry.Registration) -> dict:
    """Register a trained, evaluated model as `tessera-<dataset>-<model>` (tasks/eval/registry.py). Not cached: it
    asks the registry, which finds the version of a checkpoint it already holds (a cached re-run adds none)."""
    return plain(registry.register(model, record, test, Path(prep), {k: str(v) for k, v in codebooks.items()}, reg))
