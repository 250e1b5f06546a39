"""A training stopped and started again: SIGKILL then the same command resumes the same MLflow run with the same
metrics and best checkpoint, a failed run resumes step-exact, SIGTERM ends a run KILLED, and a damaged, foreign or
missing checkpoint is a clear error before anything starts. The trainer runs in a subprocess slowed down by a patched
get_lr (tiny prep folder: tests/helpers.py make_prep)."""

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

import pytest
import torch

import tasks.train.trainer as trainer
from tasks.infra.checkpoint import BEST, save_checkpoint
from tasks.train.trainer import CKPT, CheckpointError, get_lr, load_checkpoint, train

from tests.helpers import (TINY_TRAIN, _shared_mlflow, all_metrics, assert_same_metrics,  # noqa: F401 (fixtures)
                           experiment_runs, mlflow_db, prep, tracking_client, train_losses)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(prep, mlflow_db, tmp_path_factory) -> tuple[dict, dict]:
    """An uninterrupted TINY_TRAIN run of the AST: (its record, every metric), what an interrupted run must match."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_db)
        record = train("ast", prep, tmp_path_factory.mktemp("reference"), TINY_TRAIN, preset="tiny",
                       experiment="reference")
        return record, all_metrics(record["run_id"])


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
    return max((m.step for m in tracking_client().get_metric_history(run_id, "train/loss")), default=0)


def test_kill_and_resume_continues_the_same_run_with_the_same_metrics(prep, tmp_path, monkeypatch, reference):
    out = tmp_path / "killed"
    proc = _child(prep, out, "kill", sleep=0.4, cwd=tmp_path)
    # kill after the first checkpoint (step 4) and after a metric flush past it (steps 5 and 6, sent at step 6)
    _wait_for(lambda: (out / CKPT).exists() and _logged_through(out) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (out / "_SUCCESS").exists()
    (run,) = experiment_runs("kill")
    assert run.info.status == "RUNNING"  # SIGKILL cannot be caught: resuming is what ends it

    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    record = train("ast", prep, out, TINY_TRAIN, preset="tiny", experiment="kill")
    assert loads and all(w is True for w in loads)
    (run,) = experiment_runs("kill")
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    # every metric step sent exactly once, with the values of the uninterrupted run
    expected_record, expected = reference
    assert_same_metrics(all_metrics(record["run_id"]), expected)
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
    (run,) = experiment_runs("failed")
    assert run.info.status == "FAILED" and load_checkpoint(out / CKPT)["step"] == 4
    assert sorted(train_losses(run.info.run_id)) == [1, 2, 3, 4, 5]  # step 5 left the buffer as the run ended

    record = train("ast", prep, out, TINY_TRAIN, preset="tiny", experiment="failed")
    (run,) = experiment_runs("failed")
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    expected_record, expected = reference
    metrics = all_metrics(record["run_id"])
    assert_same_metrics(metrics, expected)
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
    (run,) = experiment_runs("term")
    assert run.info.status == "KILLED"


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
    assert experiment_runs("corrupt") == []  # nothing was started in MLflow
