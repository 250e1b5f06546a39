"""What the trainer (tasks/train/trainer.py) tells MLflow and stdout: the run (tracked_run), its params, tags and
dataset at the start (report_start), progress while training (the Throughput meter: perf/*, one line per log step),
and the record, artifacts and tags at the end (run_record, report_end). The MLflow client: tasks/infra/tracking.py.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from tasks.infra import tracking
from tasks.infra.checkpoint import STATE
from tasks.infra.common import read_success, tree_digest, write_json
from tasks.infra.hardware import peak_flops, sync
from tasks.train.budget import plan_budget
from tasks.train.state import Data, Env, Job, State

LOSS_KEY = "train/loss"


# ---------------------------------------------------------------------------------------------------- throughput
@dataclass
class Throughput:
    """Samples/s, tokens/s and MFU over the steps since the last restart (eval and checkpoint time left out)."""

    flops: float  # per training sample
    tokens: int  # sequence positions per sample
    peak: float  # FLOP/s of all ranks together; 0 where not measured (ranks other than 0)
    t0: float = field(default_factory=time.perf_counter)
    window: int = 0  # optimiser steps since t0

    def restart(self) -> None:
        self.t0, self.window = time.perf_counter(), 0


def model_flops(net: nn.Module, job: Job, model_cfg: Any) -> tuple[float, str]:
    """(training FLOPs per sample, where the figure comes from): the model's own count, else 6 x params x tokens."""
    if hasattr(net, "flops_per_sample"):
        return net.flops_per_sample(train=True), "model"
    n_params = sum(p.numel() for p in net.parameters())
    return 6 * n_params * job.model_spec.tokens(model_cfg), "6*n_params*tokens (estimate)"


# ---------------------------------------------------------------------------------------------------- run
class _NoRun:
    """Stands in for the MLflow run on DDP ranks other than 0 (they log nothing)."""

    run_id, resumed = None, True


def tracked_run(job: Job, env: Env, run_id: str | None):
    """The MLflow run (a new one, or `run_id` continued) on rank 0; a stand-in that logs nothing elsewhere."""
    if not env.master:
        return contextlib.nullcontext(_NoRun())
    return tracking.start_run(job.experiment, f"train-{job.model}", job.parent_run_id, run_id, job.tags,
                              spool_dir=job.out_dir)  # metrics MLflow has not taken at a checkpoint wait there


def report_start(job: Job, env: Env, data: Data, state: State, run) -> None:
    """A new run: its id into train.json, params, tags, the dataset. A continued one: skip the steps it has."""
    if not env.master:
        return
    if run.resumed:
        run.metrics.skip_through = run.last_step(LOSS_KEY)  # steps an earlier attempt had already sent
        return
    write_json(job.out_dir / STATE, {"run_id": run.run_id, "checkpoint_step": 0})
    flops, source = model_flops(state.net, job, data.model_cfg)
    n_params = sum(p.numel() for p in state.net.parameters())
    run.log_params({"model": job.model, "preset": job.preset, "n_params": n_params, "world_size": env.world,
                    "device": str(env.device), "dtype": str(env.dtype).removeprefix("torch."),
                    "flops_per_sample": flops, "flops_source": source, "train": asdict(job.cfg),
                    "config": asdict(data.model_cfg), "budget": asdict(job.budget) if job.budget else {}})
    run.set_tags({"tessera.model": job.model, "tessera.out_dir": str(job.out_dir)})
    prep = read_success(job.prep_dir) or {}
    run.log_dataset(f"prep/{job.model_spec.modality}", prep.get("digest") or tree_digest(job.prep_dir)[:32],
                    str(job.prep_dir))


def start_meter(job: Job, env: Env, data: Data, state: State) -> Throughput:
    """The throughput meter; the device's peak FLOP/s is measured (once per process) on rank 0 only."""
    flops, _ = model_flops(state.net, job, data.model_cfg)
    peak = peak_flops(env.device, env.dtype) * env.world if env.master else 0.0
    return Throughput(flops, job.model_spec.tokens(data.model_cfg), peak)


def progress(job: Job, env: Env, state: State, meter: Throughput, train: dict) -> dict[str, float]:
    """perf/* over the steps since the meter's restart (all ranks' samples), data/epoch; one line on stdout."""
    cfg = job.cfg
    sync(env.device)
    sps = meter.window * cfg.batch_size * cfg.grad_accum * env.world / (time.perf_counter() - meter.t0)
    mfu = sps * meter.flops / meter.peak if meter.peak else 0.0
    print(f"[{job.model}] step {state.step}/{cfg.max_steps} loss {train[LOSS_KEY].item():.4f} "
          f"lr {train['train/lr']:.2e} {sps:.0f} samples/s mfu {mfu:.1%}", flush=True)
    return {"perf/samples_per_s": sps, "perf/tokens_per_s": sps * meter.tokens, "perf/mfu": mfu,
            "data/epoch": state.stream.epoch}


def run_record(job: Job, state: State, run_id: str | None) -> dict:
    """The record train() returns: "checkpoint" is the best evaluation's (best.pt; ckpt.pt with no val split), what
    evaluation and the models that start from this one read; "last_checkpoint" is what a resume reads."""
    best = state.best_step and job.best_path.exists()
    budget = job.budget or plan_budget(job.cfg, 0)
    return {"checkpoint": str(job.best_path if best else job.ckpt_path), "last_checkpoint": str(job.ckpt_path),
            "run_id": run_id, "model": job.model, "out_dir": str(job.out_dir), "steps": state.step,
            "planned_steps": budget.steps, "epochs": round(budget.epochs_of(state.step), 3),
            "planned_epochs": round(budget.epochs_of(budget.steps), 3), "n_train": budget.n_train,
            "stopped_early": state.stopped, "best_step": state.best_step if best else state.step,
            "time_capped": state.step < budget.steps and not state.stopped,
            "train_seconds": round(state.clock.spent, 1),
            "best_val": {k: float(v) for k, v in (state.best if best else state.val).items()},
            "final_val_loss": state.val.get("val/loss"), "metrics": {k: float(v) for k, v in state.val.items()}}


def report_end(job: Job, env: Env, data: Data, state: State, run) -> dict:
    """The record (run_record); on rank 0 the checkpoints as the run's artifacts, and whether and where it stopped
    early as tags. Registration comes after evaluation (tasks/eval/registry.py)."""
    record = run_record(job, state, run.run_id)
    if env.master:
        run.catch_up()  # MLflow may have been away: wait (bounded, saying so) until it has every metric
        run.client.log_artifact(run.run_id, str(job.ckpt_path), artifact_path="checkpoint")
        if record["checkpoint"] != record["last_checkpoint"]:
            run.client.log_artifact(run.run_id, record["checkpoint"], artifact_path="checkpoint")
        run.set_tags({"tessera.stopped_early": str(state.stopped).lower(), "tessera.best_step": record["best_step"],
                      "tessera.time_capped": str(record["time_capped"]).lower()})
    return record
