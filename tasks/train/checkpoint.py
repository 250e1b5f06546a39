"""The trainer's checkpoints (tasks/train/trainer.py): where a run resumes from (resume_point, check_best,
restore_rng) and what it writes (save_state: ckpt.pt and train.json; save_best: best.pt). The files' format, keys and
atomic writes: tasks/infra/checkpoint.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from models import rng
from tasks.infra.checkpoint import (
    STATE,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasks.infra.common import write_json
from tasks.train.state import Data, Env, Job, State


# ---------------------------------------------------------------------------------------------------- resume
def _read_state(out_dir: Path) -> dict:
    path = out_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def resume_point(job: Job, data: Data) -> tuple[dict | None, str | None]:
    """(the checkpoint to continue from or None, the MLflow run id to continue or None), from out_dir."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(job.out_dir)
    path = job.ckpt_path
    ckpt = load_checkpoint(path) if state.get("checkpoint_step") or path.exists() else None
    if ckpt is not None and (ckpt["model"] != job.model or ckpt["config"] != asdict(data.model_cfg)):
        raise CheckpointError(f"{path} holds a {ckpt['model']} with config {ckpt['config']}, not this "
                              f"{job.model} {asdict(data.model_cfg)}; use another out_dir or delete {job.out_dir}")
    return ckpt, state.get("run_id")


def check_best(job: Job, ckpt: dict) -> None:
    """best.pt holds the step the checkpoint names as best; a run killed between writing the checkpoint of its best
    step and best.pt (save_state, then save_best) gets best.pt written from that checkpoint. Rank 0 only."""
    best_step = ckpt.get("best_step", 0)
    if not best_step:
        return
    have = load_checkpoint(job.best_path)["step"] if job.best_path.exists() else None
    if have == best_step:
        return
    if best_step != ckpt["step"]:
        raise CheckpointError(f"{job.best_path} holds step {have}, but {job.ckpt_path} says the best evaluation was "
                              f"at step {best_step}; delete {job.out_dir} to train from scratch")
    save_checkpoint(job.best_path, {k: v for k, v in ckpt.items() if k in WEIGHTS})


def restore_rng(env: Env, ckpt: dict, seed: int) -> None:
    """The RNG states of the checkpoint: called last, nothing after it may draw from the RNGs before the next step.
    Ranks other than 0 take a seed of their own (rank 0's states are the ones a checkpoint holds)."""
    set_rng_state(ckpt["rng"])
    if env.rank:
        torch.manual_seed(seed + env.rank + ckpt["step"])
        if (draws := rng.current()) is not None:
            draws.reseed(seed + env.rank + ckpt["step"])


# ---------------------------------------------------------------------------------------------------- save
def _weights(job: Job, data: Data, state: State, run_id: str | None) -> dict:
    """What rebuilds and evaluates the model (build_from_checkpoint): best.pt holds these keys, ckpt.pt more."""
    return {"model": job.model, "config": asdict(data.model_cfg), "state_dict": state.net.state_dict(),
            "step": state.step, "run_id": run_id, "train_config": asdict(job.cfg), "val": state.val,
            "codebooks": {k: str(v) for k, v in (job.codebooks or {}).items()}, "prep_dir": str(job.prep_dir),
            "init_from": str(job.init_from) if job.init_from is not None else None}  # what a part started from


def save_state(job: Job, data: Data, state: State, run_id: str | None, dtype: torch.dtype) -> None:
    """ckpt.pt (atomically; keys: tasks/infra/checkpoint.py), then train.json naming its step. dtype: the precision
    the steps run in, which a resumed run keeps (trainer.measured_precision)."""
    save_checkpoint(job.ckpt_path, {
        **_weights(job, data, state, run_id), "optimizer": state.opt.state_dict(), "epoch": state.stream.epoch,
        "batch": state.stream.batch, "rng": rng_state(), "best_val": state.best, "best_step": state.best_step,
        "bad_evals": state.bad_evals, "stopped_early": state.stopped, "clock_s": state.clock.spent,
        "end": job.cfg.max_steps, "dtype": str(dtype).removeprefix("torch."),
    })
    write_json(job.out_dir / STATE, {"run_id": run_id, "checkpoint_step": state.step})


def save_best(job: Job, data: Data, state: State, run_id: str | None) -> None:
    """best.pt (atomically): the weights of the best evaluation, written after ckpt.pt of the same step (check_best
    repairs a kill between the two); not resumed from, so no optimiser or RNG states."""
    save_checkpoint(job.best_path, _weights(job, data, state, run_id))
