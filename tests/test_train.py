"""The trainer, its loader, registry and MLflow tracking, on a tiny learnable prep folder built in tmp.

The prep folder has the layout tasks/data/preprocess.py writes (image/ and audio/ shards, stats.json), 16x16 images
and 16x32 spectrograms whose class is visible (bright top vs bottom half; low vs high bands), so a 1-layer model
learns in a few dozen steps. Stopped and resumed trainings: test_resume.py; two ranks: test_ddp.py.

Metric steps are 1-based: every metric of optimiser step k (k steps applied) is logged at step k, so a run of N steps
logs train/loss at 1..N, perf/* at the multiples of log_every and N, val/* at the multiples of eval_every and N.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import tasks.train.checkpoint as train_checkpoint
import tasks.train.trainer as trainer
from tasks.data.loader import batches
from tasks.data.shards import CorruptShardError, shard_urls
from tasks.infra import hardware, tracking
from tasks.infra.checkpoint import BEST, WEIGHTS, save_checkpoint
from tasks.train import table as registry
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.table import MODELS, configure
from tasks.train.trainer import CKPT, TrainConfig, get_lr, load_checkpoint, train

from tests.helpers import PREP_N_FRAMES as N_FRAMES
from tests.helpers import PREP_N_MELS as N_MELS
from tests.helpers import (TINY_TRAIN, _shared_mlflow, all_metrics, experiment_runs,  # noqa: F401 (fixtures)
                           make_codebooks, metric_history, mlflow_db, prep, tracking_client, train_losses)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ tiny prep folder
@pytest.fixture(scope="module")
def codebooks(tmp_path_factory) -> dict[str, str]:
    return make_codebooks(tmp_path_factory.mktemp("codebooks"))


# ------------------------------------------------------------------------------------------------ schedule, loader
def test_get_lr_warmup_peak_cosine_end():
    cfg = TrainConfig(max_steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert get_lr(0, cfg) == pytest.approx(1e-4)  # 1/10 of the peak
    assert get_lr(9, cfg) == pytest.approx(1e-3)  # warmup ends at the peak
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(55, cfg) == pytest.approx(5.5e-4)  # half-way down the cosine: (lr + min_lr) / 2
    assert get_lr(100, cfg) == pytest.approx(1e-4) and get_lr(1000, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_loader_order_is_a_function_of_seed_and_epoch(prep):
    urls = shard_urls(prep, "audio", "train")
    keys = lambda **kw: [[s["__key__"] for s in b] for b in batches(urls, 8, shuffle_buffer=32, **kw)]  # noqa: E731
    first = keys(seed=1, epoch=0)
    assert len(first) == 8 and all(len(b) == 8 for b in first)
    assert keys(seed=1, epoch=0) == first
    assert keys(seed=1, epoch=0, start_batch=3) == first[3:]
    assert keys(seed=1, epoch=1) != first and keys(seed=2, epoch=0) != first
    assert sorted(sum(keys(seed=1, epoch=1), [])) == sorted(sum(first, []))  # a permutation of the same samples
    val = list(batches(shard_urls(prep, "audio", "val"), 6, train=False))
    assert [len(b) for b in val] == [6, 6, 4]  # eval keeps the last partial batch, in file order
    assert val[0][0]["mel"].shape == (N_MELS, N_FRAMES) and val[0][0]["info"]["label_id"] == 0


def test_corrupt_shard_names_the_shard(prep, tmp_path):
    bad = tmp_path / "image"
    bad.mkdir()
    good = (prep / "image" / "train-000000.tar").read_bytes()
    (bad / "train-000000.tar").write_bytes(good[:4096])  # cut at a member boundary: tarfile alone would not notice
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar is truncated.*end-of-archive.*`tessera data`"):
        shard_urls(tmp_path, "image", "train")
    (bad / "train-000000.tar").write_bytes(good[:1536] + b"\xff" * 64 + good[1600:])  # the 2nd member's header
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar is truncated or damaged: the member header"):
        shard_urls(tmp_path, "image", "train")
    (bad / "train-000000.tar").write_bytes(good[:600] + b"\xff" * 64 + good[664:])  # inside the 1st npy
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar does not decode.*re-run `tessera data`"):
        for _ in batches(shard_urls(tmp_path, "image", "train"), 4, train=False):
            pass
    with pytest.raises(FileNotFoundError, match="tessera data"):
        shard_urls(tmp_path, "audio", "train")


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gets_its_batch_and_a_finite_loss(name, prep, codebooks):
    spec = MODELS[name]
    data = DataInfo.load(prep, codebooks)
    cfg = configure(name, data, "tiny")
    samples = next(iter(batches(shard_urls(prep, spec.modality, "train"), 4, train=False)))
    batch = spec.make_batch(samples, BatchContext(data, cfg))
    torch.manual_seed(0)
    model = spec.build(cfg)
    output, loss = model(batch)
    assert torch.isfinite(loss)
    if spec.accuracy is not None:
        correct, count = spec.accuracy(output, batch)
        if name in ("vit", "ast", "clip"):  # one guess per sample: argmax against the label (or the diagonal)
            truth = batch["label"] if "label" in batch else torch.arange(len(output))
            assert (int(correct), count) == (int((output.argmax(-1) == truth).sum()), 4)
    if name == "imagegpt":
        assert batch["tokens"].shape == (4, 8 * 8) and int(batch["tokens"].max()) < 8
    if name == "t2i":
        assert int(batch["tgt"].max()) < 8 and batch["tgt"].shape[1] == cfg.tgt_len
    if name == "tts":  # the log-mel itself, no codebook
        assert batch["mel"].shape == (4, cfg.n_mels, cfg.n_frames) and batch["src"].shape == (4, cfg.src_len)


def test_missing_codebook_is_a_clear_error(prep):
    with pytest.raises(ValueError, match="needs the 'pixels' codebook"):
        configure("imagegpt", DataInfo.load(prep), "tiny")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", ["vit", "ast"])
def test_training_lowers_the_loss_and_records_one_run(name, prep, tmp_path, monkeypatch):
    cfg = replace(TINY_TRAIN, max_steps=30, eval_every=10, ckpt_every=10, log_every=5)
    metric_calls = []
    log_batch = MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), **kwargs):
        metric_calls.extend([len(metrics)] if metrics else [])
        return log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting_log_batch)
    record = train(name, prep, tmp_path / "out", cfg, preset="tiny", experiment=f"learn-{name}")
    assert len(metric_calls) <= 30 // 5 + 3 and sum(metric_calls) >= 30 * 3  # batched: a few calls, many values
    losses = train_losses(record["run_id"])
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(26, 31)])
    assert last < 0.7 * first, (first, last)
    assert record["metrics"]["val/accuracy"] > 0.75 and record["steps"] == 30
    (run,) = experiment_runs(f"learn-{name}")
    assert run.info.status == "FINISHED" and run.info.run_id == record["run_id"]
    assert run.data.params["train.lr"] == str(cfg.lr) and run.data.params["config.dim"] == "32"
    assert run.data.params["dtype"] == "float32"
    for key in ("train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "val/loss"):
        assert key in run.data.metrics, key
    assert sorted(metric_history(run.info.run_id, "val/loss")) == [10, 20, 30]
    assert sorted(metric_history(run.info.run_id, "perf/samples_per_s")) == [5, 10, 15, 20, 25, 30]
    ckpt = load_checkpoint(tmp_path / "out" / CKPT)
    assert ckpt["step"] == 30 and ckpt["run_id"] == record["run_id"] and ckpt["model"] == name
    # finished: a second call returns the record without training or a new run
    assert train(name, prep, tmp_path / "out", cfg, preset="tiny", experiment=f"learn-{name}") == record
    assert len(experiment_runs(f"learn-{name}")) == 1


def test_every_metric_of_step_k_is_logged_at_step_k(prep, tmp_path, monkeypatch):
    """Known answers for 7 steps with log_every=3, eval_every=4, ckpt_every=5 (64 train images, batch 16: 4 batches
    an epoch): train/* at 1..7 with the k-th step's lr at k, perf/* and data/epoch at 3, 6, 7, val/* at 4 and 7,
    checkpoints at 5 and 7 and at every better evaluation (4 and 7: ckpt.pt, then best.pt); the last holds the step,
    data position and val/* of step 7."""
    cfg = replace(TINY_TRAIN, max_steps=7, log_every=3, eval_every=4, ckpt_every=5)
    saved = []

    def spy_save(path, ckpt):
        saved.append((Path(path).name, ckpt["step"]))
        save_checkpoint(path, ckpt)

    monkeypatch.setattr(train_checkpoint, "save_checkpoint", spy_save)  # where save_state and save_best call it
    record = train("vit", prep, tmp_path / "out", cfg, preset="tiny", experiment="steps")
    metrics = all_metrics(record["run_id"])
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert sorted(metrics[key]) == [1, 2, 3, 4, 5, 6, 7], key
    assert metrics["train/lr"][1] == pytest.approx(1.5e-3) and metrics["train/lr"][2] == pytest.approx(3e-3)  # warmup
    assert metrics["train/lr"] == pytest.approx({k: get_lr(k - 1, cfg) for k in range(1, 8)})
    for key in ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu"):
        assert sorted(metrics[key]) == [3, 6, 7], key
    assert metrics["data/epoch"] == {3: 0, 6: 1, 7: 1}
    assert sorted(metrics["val/loss"]) == sorted(metrics["val/accuracy"]) == [4, 7]
    val = {k: {key: metrics[key][k] for key in ("val/loss", "val/accuracy")} for k in (4, 7)}
    assert MODELS["vit"].score(val[7]) > MODELS["vit"].score(val[4])  # step 7 is a better evaluation (ties: loss)
    assert saved == [(CKPT, 4), (BEST, 4), (CKPT, 5), (CKPT, 7), (BEST, 7)] and record["steps"] == 7
    ckpt = load_checkpoint(tmp_path / "out" / CKPT)
    assert sorted(ckpt) == ["bad_evals", "batch", "best_step", "best_val", "clock_s", "codebooks", "config", "dtype",
                            "end", "epoch", "init_from", "model", "optimizer", "prep_dir", "rng", "run_id",
                            "state_dict", "step", "stopped_early", "train_config", "val"]
    assert sorted(load_checkpoint(tmp_path / "out" / BEST)) == sorted(WEIGHTS)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (7, 1, 3)  # 7 batches: 4 of epoch 0, 3 of epoch 1
    assert ckpt["val"] == {k: metrics[k][7] for k in ("val/loss", "val/accuracy")} == record["metrics"]
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == {"run_id": record["run_id"],
                                                                         "checkpoint_step": 7}


def test_hardware_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert hardware.pick_device("cpu") == cpu
    assert hardware.compute_dtype("fp32", cpu) == torch.float32
    assert hardware.compute_dtype("bf16", cpu) == torch.bfloat16
    before = torch.get_num_threads()
    with hardware.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    rng = torch.get_rng_state()
    assert hardware.peak_flops(cpu, torch.float32) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # measuring draws nothing: resumed runs stay step-exact
    assert hardware.distributed(cpu) == (0, 1)  # no WORLD_SIZE: one process, no process group


def test_auto_precision_takes_the_faster_step_and_a_resume_keeps_it(prep, tmp_path, monkeypatch):
    """hardware.faster_dtype times a step both ways and keeps the faster (bf16 only by a margin: the timing's noise
    must not flip the choice between runs), drawing nothing from the RNG; the trainer measures its model's own step
    where the device's bf16 is fast, records it in ckpt.pt, and a resume reuses it."""
    import time

    from tasks.train import trainer

    cpu = torch.device("cpu")
    slow_in_bf16 = lambda: (time.sleep(0.02 if torch.is_autocast_enabled("cpu") else 0.0), torch.rand(1))  # noqa: E731
    slow_in_fp32 = lambda: (time.sleep(0.0 if torch.is_autocast_enabled("cpu") else 0.02), torch.rand(1))  # noqa: E731
    rng = torch.get_rng_state()
    assert hardware.faster_dtype(slow_in_bf16, cpu)[0] == torch.float32
    assert hardware.faster_dtype(slow_in_fp32, cpu)[0] == torch.bfloat16
    a_little_slow_in_fp32 = lambda: time.sleep(0.020 if torch.is_autocast_enabled("cpu") else 0.023)  # noqa: E731
    dtype, seconds = hardware.faster_dtype(a_little_slow_in_fp32, cpu)
    assert seconds[torch.bfloat16] < seconds[torch.float32] and dtype == torch.float32  # within BF16_MARGIN: fp32
    assert torch.equal(torch.get_rng_state(), rng)

    monkeypatch.setattr(trainer, "compute_dtype", lambda precision, device: torch.bfloat16)  # a CPU with fast bf16
    chosen = []
    real = trainer.faster_dtype
    monkeypatch.setattr(trainer, "faster_dtype", lambda step, device: chosen.append(1) or real(step, device))
    cfg = replace(TINY_TRAIN, precision="auto", max_steps=4)
    train("vit", prep, tmp_path / "out", cfg, preset="tiny")
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert chosen == [1] and ckpt["dtype"] in ("bfloat16", "float32")
    env = trainer.setup(cfg)
    monkeypatch.setattr(trainer, "faster_dtype", lambda step, device: pytest.fail("a resume measures again"))
    kept = trainer.measured_precision(trainer.Job("vit", prep, tmp_path, cfg), env, None, None, {"dtype": "float32"})
    assert kept.dtype == torch.float32 and not kept.autocast._enabled
    fixed = trainer.measured_precision(trainer.Job("vit", prep, tmp_path, replace(cfg, precision="bf16")), env,
                                       None, None, None)
    assert fixed is env  # only "auto" is measured


def test_tracking_uri_defaults_to_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_nested_run_and_rebuild_from_checkpoint(prep, tmp_path):
    """A training under a parent run is nested under it; its checkpoint rebuilds the model (registration, after
    evaluation: tests/test_registry.py)."""
    c = tracking_client()
    parent = c.create_run(tracking.experiment_id(c, "r"), run_name="flow").info.run_id
    cfg = replace(TINY_TRAIN, max_steps=2)
    record = train("vit", prep, tmp_path / "out", cfg, preset="tiny", experiment="r", parent_run_id=parent)
    assert c.get_run(record["run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert "registered" not in record and not c.search_registered_models()
    model, ckpt = registry.build_from_checkpoint(record["checkpoint"])
    assert ckpt["config"]["dim"] == 32 and not model.training


def test_bad_configs():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="unknown model"):
        registry.spec("resnet")
