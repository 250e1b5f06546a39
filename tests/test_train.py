"""The trainer, its loader, registry and MLflow tracking, on a tiny learnable prep folder built in tmp.

The prep folder has the layout tasks/data/preprocess.py writes (image/ and audio/ shards, stats.json), 16x16 images
and 16x32 spectrograms whose class is visible (bright top vs bottom half; low vs high bands), so a 1-layer model
learns in a few dozen steps. Kill/resume and SIGTERM run the trainer in a subprocess slowed down by a patched get_lr.

Metric steps are 1-based: every metric of optimiser step k (k steps applied) is logged at step k, so a run of N steps
logs train/loss at 1..N, perf/* at the multiples of log_every and N, val/* at the multiples of eval_every and N.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
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
from tasks.train.trainer import CKPT, CheckpointError, TrainConfig, get_lr, load_checkpoint, train

from tests.helpers import PREP_N_FRAMES as N_FRAMES
from tests.helpers import PREP_N_MELS as N_MELS
from tests.helpers import TINY_TRAIN, _shared_mlflow, make_codebooks, mlflow_db, prep  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
DDP_TOLERANCE = 0.15  # mean |loss_ddp - loss_single| per step: rank 0 logs its own 16 samples' loss, not all 32


# ------------------------------------------------------------------------------------------------ tiny prep folder
@pytest.fixture(scope="module")
def codebooks(tmp_path_factory) -> dict[str, str]:
    return make_codebooks(tmp_path_factory.mktemp("codebooks"))


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def _runs(experiment: str):
    c = _client()
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def _metric(run_id: str, key: str) -> dict[int, float]:
    """{step: value} of one metric; fails if any step was logged twice."""
    history = _client().get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in history}


def _losses(run_id: str) -> dict[int, float]:
    return _metric(run_id, "train/loss")


def _history(run_id: str) -> dict[str, dict[int, float]]:
    """Every metric of the run: {key: {step: value}}."""
    return {key: _metric(run_id, key) for key in _client().get_run(run_id).data.metrics}


def _assert_same_metrics(got: dict, expected: dict) -> None:
    """The same metrics at the same steps; the same values too, except perf/* (timings differ from run to run)."""
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert sorted(got[key]) == sorted(expected[key]), key
        if not key.startswith("perf/"):
            assert got[key] == expected[key], key


@pytest.fixture(scope="module")
def reference(prep, mlflow_db, tmp_path_factory) -> tuple[dict, dict]:
    """An uninterrupted TINY_TRAIN run of the AST: (its record, every metric), what an interrupted run must match."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_db)
        record = train("ast", prep, tmp_path_factory.mktemp("reference"), TINY_TRAIN, preset="tiny",
                       experiment="reference")
        return record, _history(record["run_id"])


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
    losses = _losses(record["run_id"])
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(26, 31)])
    assert last < 0.7 * first, (first, last)
    assert record["metrics"]["val/accuracy"] > 0.75 and record["steps"] == 30
    (run,) = _runs(f"learn-{name}")
    assert run.info.status == "FINISHED" and run.info.run_id == record["run_id"]
    assert run.data.params["train.lr"] == str(cfg.lr) and run.data.params["config.dim"] == "32"
    assert run.data.params["dtype"] == "float32"
    for key in ("train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "val/loss"):
        assert key in run.data.metrics, key
    assert sorted(_metric(run.info.run_id, "val/loss")) == [10, 20, 30]
    assert sorted(_metric(run.info.run_id, "perf/samples_per_s")) == [5, 10, 15, 20, 25, 30]
    ckpt = load_checkpoint(tmp_path / "out" / CKPT)
    assert ckpt["step"] == 30 and ckpt["run_id"] == record["run_id"] and ckpt["model"] == name
    # finished: a second call returns the record without training or a new run
    assert train(name, prep, tmp_path / "out", cfg, preset="tiny", experiment=f"learn-{name}") == record
    assert len(_runs(f"learn-{name}")) == 1


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
    metrics = _history(record["run_id"])
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
    """hardware.faster_dtype times a step both ways and keeps the faster, drawing nothing from the RNG; the trainer
    measures its model's own step where the device's bf16 is fast, records it in ckpt.pt, and a resume reuses it."""
    import time

    from tasks.train import trainer

    cpu = torch.device("cpu")
    slow_in_bf16 = lambda: (time.sleep(0.02 if torch.is_autocast_enabled("cpu") else 0.0), torch.rand(1))  # noqa: E731
    slow_in_fp32 = lambda: (time.sleep(0.0 if torch.is_autocast_enabled("cpu") else 0.02), torch.rand(1))  # noqa: E731
    rng = torch.get_rng_state()
    assert hardware.faster_dtype(slow_in_bf16, cpu)[0] == torch.float32
    assert hardware.faster_dtype(slow_in_fp32, cpu)[0] == torch.bfloat16
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
    c = _client()
    parent = c.create_run(tracking.experiment_id(c, "r"), run_name="flow").info.run_id
    cfg = replace(TINY_TRAIN, max_steps=2)
    record = train("vit", prep, tmp_path / "out", cfg, preset="tiny", experiment="r", parent_run_id=parent)
    assert c.get_run(record["run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert "registered" not in record and not c.search_registered_models()
    model, ckpt = registry.build_from_checkpoint(record["checkpoint"])
    assert ckpt["config"]["dim"] == 32 and not model.training


CHILD = """
import json, sys, time
import tasks.train.trainer as T
args = json.loads(sys.argv[1])
get_lr = T.get_lr
def slow_get_lr(step, cfg):  # called once per step: makes the run slow enough to interrupt mid-way
    time.sleep(args["sleep"])
    return get_lr(step, cfg)
T.get_lr = slow_get_lr
cfg = T.TrainConfig(**args["cfg"])
T.train(args["model"], args["prep"], args["out"], cfg, preset="tiny", experiment=args["experiment"])
"""


def _child(prep: Path, out: Path, experiment: str, sleep: float, cwd: Path) -> subprocess.Popen:
    from dataclasses import asdict

    args = {"model": "ast", "prep": str(prep), "out": str(out), "experiment": experiment, "sleep": sleep,
            "cfg": asdict(TINY_TRAIN)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the training subprocess ended early:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def _logged_through(out: Path) -> int:
    """The last train/loss step the run in `out` has sent to MLflow (0 before any)."""
    state = out / "train.json"
    if not state.is_file():
        return 0
    run_id = json.loads(state.read_text())["run_id"]
    return max((m.step for m in _client().get_metric_history(run_id, "train/loss")), default=0)


def test_kill_and_resume_continues_the_same_run_with_the_same_metrics(prep, tmp_path, monkeypatch, reference):
    out = tmp_path / "killed"
    proc = _child(prep, out, "kill", sleep=0.4, cwd=tmp_path)
    # kill after the first checkpoint (step 4) and after a metric flush past it (steps 5 and 6, sent at step 6)
    _wait_for(lambda: (out / CKPT).exists() and _logged_through(out) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (out / "_SUCCESS").exists()
    (run,) = _runs("kill")
    assert run.info.status == "RUNNING"  # SIGKILL cannot be caught: resuming is what ends it

    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    record = train("ast", prep, out, TINY_TRAIN, preset="tiny", experiment="kill")
    assert loads and all(w is True for w in loads)
    (run,) = _runs("kill")
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    # every metric step sent exactly once, with the values of the uninterrupted run
    expected_record, expected = reference
    _assert_same_metrics(_history(record["run_id"]), expected)
    assert sorted(expected["train/loss"]) == list(range(1, TINY_TRAIN.max_steps + 1))
    assert record["final_val_loss"] == expected_record["final_val_loss"]
    _assert_same_best(record, expected_record)


def _assert_same_best(record: dict, expected: dict) -> None:
    """A resumed run's best evaluation, patience count and best.pt weights equal the uninterrupted run's."""
    keys = ("best_step", "best_val", "stopped_early", "steps", "planned_steps")
    assert {k: record[k] for k in keys} == {k: expected[k] for k in keys}
    assert Path(record["checkpoint"]).name == BEST and Path(record["last_checkpoint"]).name == CKPT
    got, want = load_checkpoint(record["checkpoint"]), load_checkpoint(expected["checkpoint"])
    assert got["step"] == want["step"] == expected["best_step"] and got["val"] == want["val"]
    assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
    last, want_last = load_checkpoint(record["last_checkpoint"]), load_checkpoint(expected["last_checkpoint"])
    assert [last[k] for k in ("best_step", "bad_evals", "best_val")] == [want_last[k] for k in ("best_step",
                                                                                                "bad_evals", "best_val")]


def test_a_failed_run_resumes_step_exact(prep, tmp_path, monkeypatch, reference):
    """A run that fails after step 5 (checkpoint at 4) has sent step 5's metrics as it ended; resuming recomputes
    step 5 from the checkpoint without sending it again, and the whole record equals the uninterrupted run's."""
    out = tmp_path / "failed"

    def failing_get_lr(step, cfg):  # step: optimiser steps applied so far; fail at the top of the 6th
        if step == 5:
            raise RuntimeError("boom")
        return get_lr(step, cfg)

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "get_lr", failing_get_lr)
        with pytest.raises(RuntimeError, match="boom"):
            train("ast", prep, out, TINY_TRAIN, preset="tiny", experiment="failed")
    (run,) = _runs("failed")
    assert run.info.status == "FAILED" and load_checkpoint(out / CKPT)["step"] == 4
    assert sorted(_losses(run.info.run_id)) == [1, 2, 3, 4, 5]  # step 5 left the buffer as the run ended

    record = train("ast", prep, out, TINY_TRAIN, preset="tiny", experiment="failed")
    (run,) = _runs("failed")
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    expected_record, expected = reference
    metrics = _history(record["run_id"])
    _assert_same_metrics(metrics, expected)
    assert sorted(metrics["val/loss"]) == [4, 8, 12] and sorted(metrics["perf/mfu"]) == [3, 6, 9, 12]
    assert record["metrics"] == expected_record["metrics"] and record["steps"] == 12
    _assert_same_best(record, expected_record)


def test_sigterm_ends_the_run_killed(prep, tmp_path):
    out = tmp_path / "term"
    proc = _child(prep, out, "term", sleep=0.25, cwd=tmp_path)
    _wait_for(lambda: _logged_through(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    (run,) = _runs("term")
    assert run.info.status == "KILLED"


DDP_CHILD = """
import json, os, sys
import torch, torch.distributed as dist
import tasks.train.checkpoint as C
import tasks.train.trainer as T
from tasks.data import loader
from tasks.infra import tracking

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
report = {"rank": rank, "shards": [], "checkpoints": 0, "mlflow_runs": 0}
nets, stop_at = [], [args["stop_at"]]
make_optimizer, batches, save_checkpoint, start_run, get_lr = (T.make_optimizer, loader.batches, C.save_checkpoint,
                                                               tracking.start_run, T.get_lr)

class Stop(Exception):
    pass

def spy_optimizer(model, cfg, device):  # the module every rank trains (DDP wraps it)
    nets.append(model)
    return make_optimizer(model, cfg, device)

def spy_batches(urls, batch_size, **kw):  # which shards this rank trains on, per epoch
    for b in batches(urls, batch_size, **kw):
        if kw.get("train", True) and kw.get("split_nodes", True):
            report["shards"] += [[kw.get("epoch", 0), os.path.basename(s["__url__"])] for s in b]
        yield b

def spy_save(path, ckpt):
    report["checkpoints"] += 1
    save_checkpoint(path, ckpt)

def spy_start_run(*a, **kw):
    report["mlflow_runs"] += 1
    return start_run(*a, **kw)

def stopping_get_lr(step, cfg):  # both ranks stop at the top of the same step, before its collectives
    if step == stop_at[0]:
        raise Stop(step)
    return get_lr(step, cfg)

T.make_optimizer, loader.batches, C.save_checkpoint, tracking.start_run, T.get_lr = (
    spy_optimizer, spy_batches, spy_save, spy_start_run, stopping_get_lr)
run = lambda: T.train("ast", args["prep"], args["out"], T.TrainConfig(**args["cfg"]), preset="tiny",
                      experiment="ddp")
try:
    run()
except Stop:
    dist.barrier()  # rank 0 has written the checkpoint of step stop_at; now every rank resumes from it
    stop_at[0] = None
    run()
torch.save(nets[-1].state_dict(), os.path.join(args["out"], f"params-rank{rank}.pt"))
with open(os.path.join(args["out"], f"report-rank{rank}.json"), "w") as f:
    json.dump(report, f)
sys.stdout.flush()
os._exit(0)  # skip the interpreter's teardown of torch, mlflow and prefect: seconds per rank on a loaded 2-core box
"""


def test_ddp_two_cpu_processes_match_one_process_with_the_global_batch(prep, tmp_path):
    """torchrun, 2 ranks on gloo, stopped after the step-4 checkpoint and resumed: each rank trains on its own audio
    shard, rank 0 alone logs and checkpoints, parameters stay identical across ranks, and the loss curve follows a
    single-process run with the same global batch (2 x 16 = 32)."""
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    out = tmp_path / "out"
    cfg = replace(TINY_TRAIN, max_steps=8)  # checkpoints at steps 4 and 8: stopped at 4, resumed to 8
    args = {"prep": str(prep), "out": str(out), "cfg": asdict(cfg), "stop_at": 4}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((out / f"report-rank{r}.json").read_text()) for r in (0, 1)]

    # one MLflow run, resumed (not restarted): every step logged once, by rank 0 alone
    (run,) = _runs("ddp")
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    ddp = _losses(run.info.run_id)
    assert sorted(ddp) == list(range(1, cfg.max_steps + 1))
    assert [r["mlflow_runs"] for r in reports] == [2, 0]  # the first attempt and the resumed one
    assert [r["checkpoints"] > 0 for r in reports] == [True, False] and (out / "_SUCCESS").exists()

    # each rank its own shard: in every epoch the two ranks read disjoint shards, together all of them
    per_epoch: dict[int, list[set]] = {}
    for r in reports:
        for epoch, shard in r["shards"]:
            per_epoch.setdefault(epoch, [set(), set()])[r["rank"]].add(shard)
    assert len(per_epoch) >= 2
    for epoch, (a, b) in per_epoch.items():
        assert a and b and not a & b and a | b == {"train-000000.tar", "train-000001.tar"}, (epoch, a, b)

    # parameters identical across ranks, and equal to what rank 0 checkpointed
    p0, p1 = (torch.load(out / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    ckpt = load_checkpoint(out / CKPT)
    assert ckpt["step"] == cfg.max_steps and all(torch.equal(ckpt["state_dict"][k], p0[k]) for k in p0)

    # the loss curve of one process with the same global batch: same start, same descent, within sampling noise
    single = train("ast", prep, tmp_path / "single", replace(cfg, batch_size=2 * cfg.batch_size), preset="tiny",
                   experiment="ddp-single")
    one = _losses(single["run_id"])
    steps = range(1, cfg.max_steps + 1)
    curves = f"ddp {[round(ddp[s], 3) for s in steps]} vs one process {[round(one[s], 3) for s in steps]}"
    assert abs(ddp[1] - one[1]) < 0.1, curves  # the same initial weights
    assert np.mean([abs(ddp[s] - one[s]) for s in steps]) < DDP_TOLERANCE, curves
    assert abs(np.mean([ddp[s] for s in steps[-4:]]) - np.mean([one[s] for s in steps[-4:]])) < DDP_TOLERANCE, curves


def test_damaged_foreign_or_missing_checkpoint_is_a_clear_error(prep, tmp_path):
    """Each case starts from a real checkpoint (a 2-step ViT run) and fails before anything starts in MLflow."""
    good = tmp_path / "good"
    train("vit", prep, good, replace(TINY_TRAIN, max_steps=2), preset="tiny", experiment="source")
    ckpt = load_checkpoint(good / CKPT)
    out = tmp_path / "out"
    out.mkdir()
    run = lambda **kw: train("vit", prep, out, TINY_TRAIN, preset="tiny", experiment="corrupt", **kw)  # noqa: E731
    # cut short (a copy that died half-way)
    (out / CKPT).write_bytes((good / CKPT).read_bytes()[:2048])
    with pytest.raises(CheckpointError, match=r"ckpt\.pt cannot be read.*delete"):
        run()
    # an object outside the weights-only allowlist is refused, not unpickled
    save_checkpoint(out / CKPT, {**ckpt, "bad": Path("x")})
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(out / CKPT)
    # a checkpoint of another config: not silently loaded into this one
    save_checkpoint(out / CKPT, ckpt)
    with pytest.raises(CheckpointError, match=r"holds a vit with config .*'dim': 32.*not this vit .*'dim': 48"):
        run(model_overrides={"dim": 48})
    # the state file says a checkpoint was written, but it is gone
    (out / CKPT).unlink()
    shutil.copy(good / "train.json", out / "train.json")
    assert json.loads((out / "train.json").read_text())["checkpoint_step"] == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        run()
    assert _runs("corrupt") == []  # nothing was started in MLflow


def test_bad_configs():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="unknown model"):
        registry.spec("resnet")
