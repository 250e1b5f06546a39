"""One trainer for every model in tasks/train/table.py, in nanoGPT's sections.

    train(model, prep_dir, out_dir, TrainConfig(...)) -> {"checkpoint" (best.pt), "last_checkpoint", "run_id",
                                                           "steps", "best_step", "best_val", "stopped_early", ...}

setup (device, DDP, threads, precision: tasks/infra/hardware.py) -> data (shards -> make_batch) -> budget (epochs
over the train split -> steps, within a cap and a floor: tasks/train/budget.py plan_budget; a wall-clock cap,
max_minutes, may move the schedule's end while training: budget.Clock) -> model + AdamW -> resume -> MLflow run
(params) -> loop: one optimiser step = lr = get_lr(step); grad_accum micro-batches (bf16 autocast where it pays, DDP
no_sync but the last); clip; step -> then log (buffered, sent every log_every steps), evaluate on the val split every
eval_every steps (a better val metric, table `monitor`: best.pt; `patience` evaluations without one: stop early),
checkpoint every ckpt_every steps, at a new best, at a stop and at the end -> report (the checkpoints as artifacts,
the record; registration comes after evaluation: tasks/eval/registry.py).
This module: setup, model, the loop, evaluation; what it reads (data, budget): tasks/train/feed.py; the config and
run state: tasks/train/state.py; resume and checkpoints: tasks/train/checkpoint.py; MLflow runs and progress lines:
tasks/train/report.py.

Metric steps: every metric of optimiser step k (1-based: k steps have been applied) is logged at step k: train/loss,
train/lr and train/grad_norm of the k-th step; perf/* and data/epoch measured up to step k; val/* computed after
step k. So a run of N steps logs train/loss at 1..N and val/* at the multiples of eval_every and at N; a checkpoint
at step k holds the weights after step k and the val/* of step k.

A run that dies ends its MLflow run FAILED, or KILLED on Ctrl-C or SIGTERM (a handler turns SIGTERM into an
exception while training runs in the main thread); it is never left RUNNING, except by SIGKILL, which the next start
ends (KILLED; tasks/infra/tracking.py).

Resume: `out_dir/ckpt.pt` (written atomically) holds the weights, the optimiser, the step, the data position
(epoch, batch), every RNG state, the best evaluation and the patience count; `out_dir/best.pt` the weights of the
best evaluation (written after the checkpoint of its step, so a resume can rewrite it: check_best);
`out_dir/train.json` holds the MLflow run id from the moment the run exists.
Calling train() again with the same out_dir after a crash or kill continues that run from the checkpoint: the data
order depends only on (seed, epoch), so on CPU the resumed losses equal the uninterrupted ones step for step. A
step's train/loss is buffered after its other metrics, so a stored train/loss at step k means every metric of steps
<= k is stored; the resumed run sends nothing up to the last stored train/loss step (tracking.MetricBuffer's
skip_through), and every metric step reaches MLflow exactly once. `out_dir/_SUCCESS` marks a finished run; train()
then returns its record without training. Checkpoints load only with torch.load(weights_only=True).

Random draws: a training draws its dropout masks, stochastic depth and augmentations from generators of its own,
seeded with `seed` (+ the rank; models/rng.py own_draws), and its initial weights from torch's global generator seeded
with `seed` under a lock (rng.seeded). So its weights after step k depend on the seed and the data alone, whatever
trains beside it on other threads (flows/pipeline.py's lanes).

DDP: under torchrun (WORLD_SIZE > 1) every rank trains on its own shards (webdataset split_by_node); rank 0 alone
evaluates (all of the val split), logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from models import rng
from tasks.data import loader
from tasks.infra import storage
# CKPT, CheckpointError, load_checkpoint, save_checkpoint: re-exported for trainer users (save_checkpoint is called
# in tasks/train/checkpoint.py: patch it there)
from tasks.infra.checkpoint import CKPT, CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
from tasks.infra.common import read_success, write_json
from tasks.infra.hardware import compute_dtype, cpu_threads, distributed, faster_dtype, pick_device
from tasks.train.batches import BatchContext
from tasks.train.budget import Clock
from tasks.train.checkpoint import check_best, restore_rng, resume_point, save_best, save_state
from tasks.train.feed import Stream, load_data, to_device, with_budget
from tasks.train.report import LOSS_KEY, Throughput, progress, report_end, report_start, start_meter, tracked_run
from tasks.train.state import Data, Env, Job, State, TrainConfig, default_train_config  # noqa: F401 - re-exported
from tasks.train.table import MODELS, spec

BETAS = (0.9, 0.95)


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: an interrupt, so the MLflow run ends KILLED, not FAILED."""


# ---------------------------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig) -> Env:
    """Device (torchrun's LOCAL_RANK on CUDA), process group, and the autocast dtype; threads: see train()."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    rank, world = distributed(device)
    dtype = compute_dtype(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    return Env(device, local_rank, rank, world, dtype, autocast)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread (so the run ends KILLED); other threads cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"received signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- model and optimiser
def get_lr(step: int, cfg: TrainConfig) -> float:
    """The learning rate of the optimiser step taken after `step` steps (0 for the first): linear warmup to cfg.lr
    over warmup_steps, then cosine decay to min_lr at max_steps (min_lr after)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D parameters (matmul weights, embeddings), none on biases, norms, scalars."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, fused=device.type == "cuda")


def init_part(net: nn.Module, model: str, path: Path) -> int:
    """Copy the weights of a trained checkpoint into the part of `net` the table's `init` names (CLIP's image
    tower starts from the trained ViT's convolutional stem, see table.py). Returns the number of tensors copied."""
    if spec(model).init is None:
        raise ValueError(f"{model} takes no init_from checkpoint; only {[m for m, x in MODELS.items() if x.init]} do")
    source, src_prefix, dst_prefix = spec(model).init
    ckpt = load_checkpoint(path)
    if ckpt["model"] != source:
        raise ValueError(f"init_from={path} holds a {ckpt['model']}; {model} starts from a {source} checkpoint")
    part = {dst_prefix + k[len(src_prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(src_prefix)}
    own = net.state_dict()
    bad = [k for k, v in part.items() if k not in own or own[k].shape != v.shape]
    if bad or not part:
        raise ValueError(f"init_from={path}: the {source}'s {src_prefix}* weights do not fit {model}'s {dst_prefix}* "
                         f"({len(bad)} mismatched, e.g. {bad[:2]}); give both the same tower sizes")
    net.load_state_dict(part, strict=False)
    return len(part)


def build_state(job: Job, env: Env, data: Data, ckpt: dict | None) -> State:
    """The model (seeded), its optimiser, the data stream; from the checkpoint when resuming, else from init_from."""
    with rng.seeded(job.cfg.seed):  # initialisation draws from torch's global generator, held by this thread alone
        net = job.model_spec.build(data.model_cfg).to(env.device)
    opt = make_optimizer(net, job.cfg, env.device)
    step, epoch, batch, val = 0, 0, 0, {}
    if ckpt is not None:
        net.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, batch, val = ckpt["step"], ckpt["epoch"], ckpt["batch"], dict(ckpt["val"])
    elif job.init_from is not None:
        init_part(net, job.model, Path(job.init_from))
    step_model: nn.Module = torch.compile(net) if job.cfg.compile else net
    if env.world > 1:
        step_model = DDP(step_model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    cap = job.cfg.max_minutes * 60 if job.cfg.max_minutes else None
    clock = Clock(cap, before=float((ckpt or {}).get("clock_s", 0.0)), first_step=step)
    state = State(net, step_model, opt, Stream(data.train_urls, job.cfg, epoch, batch), step, val, clock=clock)
    if ckpt is not None:  # the best evaluation and the patience count (a checkpoint from before them has none)
        state.best, state.best_step = dict(ckpt.get("best_val") or {}), ckpt.get("best_step", 0)
        state.bad_evals, state.stopped = ckpt.get("bad_evals", 0), ckpt.get("stopped_early", False)
    return state


def measured_precision(job: Job, env: Env, data: Data, state: State, ckpt: dict | None) -> Env:
    """precision "auto" where the device's bf16 is fast (compute_dtype, a CPU): the faster of bf16 autocast and fp32
    for this model's own step (forward and backward on one train batch, grads cleared; hardware.faster_dtype). A
    resumed run keeps its checkpoint's. Intel AMX, one thread, 2026-12-03: every default model stepped faster in fp32
    (samples/s ViT 1.45x, CLIP 1.5x, ImageGPT 1.25x, t2i and ASR 1.2x, TTS 1.12x, AST 1.06x): at 64-192 wide the
    casts cost more than bf16's products save."""
    if job.cfg.precision != "auto" or env.device.type != "cpu" or env.dtype != torch.bfloat16 or env.world > 1:
        return env
    if ckpt is not None and ckpt.get("dtype") in ("bfloat16", "float32"):
        dtype = getattr(torch, ckpt["dtype"])
    else:
        samples = next(iter(loader.batches(data.train_urls, job.cfg.batch_size, train=False, split_nodes=False)))
        batch = to_device(job.model_spec.make_batch(samples, data.ctx), env.device)
        dtype, seconds = faster_dtype(lambda: state.step_model(batch)[1].backward(), env.device)
        state.opt.zero_grad(set_to_none=True)
        if env.master:
            print(f"[{job.model}] precision auto: {str(dtype).removeprefix('torch.')} (a step: bf16 "
                  f"{seconds[torch.bfloat16] * 1e3:.0f} ms, fp32 {seconds[torch.float32] * 1e3:.0f} ms)")
    return replace(env, dtype=dtype, autocast=torch.autocast(env.device.type, dtype=torch.bfloat16,
                                                             enabled=dtype == torch.bfloat16))


# ---------------------------------------------------------------------------------------------------- the loop
def optimiser_step(job: Job, env: Env, data: Data, state: State) -> dict[str, Any]:
    """One optimiser step: accumulate grad_accum micro-batches, clip, step. Returns its train/* metrics (0-d
    tensors where they are, so nothing waits for the device) and leaves state.step at the steps applied."""
    cfg, s = job.cfg, job.model_spec
    lr = get_lr(state.step, cfg)
    for group in state.opt.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(cfg.grad_accum):
        batch = s.make_batch(state.stream.next(), data.ctx)
        if cfg.augment is not False and s.augment is not None:
            batch = s.augment(batch, data.ctx, cfg.augment)
        batch = to_device(batch, env.device)
        sync_grads = micro == cfg.grad_accum - 1 or env.world == 1
        with (contextlib.nullcontext() if sync_grads else state.step_model.no_sync()), env.autocast:
            _, loss = state.step_model(batch)
            loss = loss / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(state.net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    state.step += 1
    return {LOSS_KEY: loss_sum, "train/lr": lr, "train/grad_norm": grad_norm}


def after_step(job: Job, env: Env, data: Data, state: State, run, meter: Throughput, train: dict) -> None:
    """Rank 0, after step k = state.step: perf/* (log steps), val/* (eval steps), then the step's train/* metrics,
    all at step k; a flush at log steps, a waited-for flush and a checkpoint at checkpoint steps."""
    if not env.master:
        return
    cfg, k = job.cfg, state.step
    last = k == cfg.max_steps
    logs, evals, ckpts = (k % every == 0 or last for every in (cfg.log_every, cfg.eval_every, cfg.ckpt_every))
    if logs:
        run.metrics.add(progress(job, env, state, meter, train), k)
    improved = False
    if evals and data.val_urls:
        state.val = evaluate(state.net, data.val_urls, data.ctx, job.model, cfg, env.device, env.autocast)
        run.metrics.add(state.val, k)
        improved = judge(job, state)
        if state.stopped:
            run.metrics.add({"stopped_early": 1.0}, k)
    run.metrics.add(train, k)  # last: a stored train/loss at k means all of step k is stored (see skip_through)
    if ckpts or improved or state.stopped:  # a new best or a stop: checkpointed at once, so a resume keeps it
        run.metrics.flush()  # waits: a resumed run never lacks steps its checkpoint is past
        save_state(job, data, state, run.run_id, env.dtype)
        if improved:
            save_best(job, data, state, run.run_id)
    elif logs:
        run.metrics.flush(wait=False)  # in the background; the flush before a checkpoint waits for it
    if k % cfg.log_every == 0 or k % cfg.eval_every == 0 or k % cfg.ckpt_every == 0:
        meter.restart()  # throughput leaves out eval and checkpoint time


def judge(job: Job, state: State) -> bool:
    """After an evaluation: True when it is the best so far (table `monitor`); else one more evaluation without
    improvement, and state.stopped once there have been cfg.patience of them."""
    s = job.model_spec
    if not state.best_step or s.score(state.val) > s.score(state.best):
        state.best, state.best_step, state.bad_evals = dict(state.val), state.step, 0
        return True
    state.bad_evals += 1
    if job.cfg.patience and state.bad_evals >= job.cfg.patience:
        state.stopped = True
        print(f"[{job.model}] stopped early at step {state.step}: {s.monitor} has not improved for {state.bad_evals} "
              f"evaluations; the best was at step {state.best_step}", flush=True)
    return False


def run_loop(job: Job, env: Env, data: Data, state: State, run, meter: Throughput) -> Job:
    """Optimiser steps until the schedule's end or an early stop -> the job, whose end the time cap may have moved."""
    state.net.train()
    while state.step < job.cfg.max_steps and not state.stopped:
        if state.clock.cap_s is not None and state.step % job.cfg.log_every == 0:
            job = time_capped(job, env, state)
        train = optimiser_step(job, env, data, state)
        meter.window += 1
        after_step(job, env, data, state, run, meter, train)
        if env.world > 1 and (state.step % job.cfg.eval_every == 0 or state.step == job.cfg.max_steps):
            flag = torch.tensor([int(state.stopped)], device=env.device)
            dist.broadcast(flag, 0)  # rank 0 alone evaluates: every rank stops where it does
            state.stopped = bool(flag.item())
    return job


def time_capped(job: Job, env: Env, state: State) -> Job:
    """The job with the schedule's end that fits TrainConfig.max_minutes at the pace so far (budget.Clock; rank 0's
    clock decides for every rank); a move of the end is said on stdout."""
    planned = job.budget.steps if job.budget else job.cfg.max_steps
    end = state.clock.end(state.step, planned) or job.cfg.max_steps  # None: not decided yet, the end stays
    if env.world > 1:
        agreed = torch.tensor([end], device=env.device)
        dist.broadcast(agreed, 0)
        end = int(agreed.item())
    if env.master and (line := state.clock.announce(job.model, end, planned)):
        print(line, flush=True)
    return job if end == job.cfg.max_steps else replace(job, cfg=replace(job.cfg, max_steps=end))


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, urls: list[str], ctx: BatchContext, name: str, cfg: TrainConfig,
             device: torch.device, autocast) -> dict[str, float]:
    """Mean loss per sample over the whole val split (+ accuracy where the model has one), in eval mode."""
    s = spec(name)
    model.eval()
    loss_sum, n, correct, count = torch.zeros((), device=device), 0, torch.zeros((), device=device), 0
    for samples in loader.batches(urls, cfg.batch_size, train=False, split_nodes=False, num_workers=cfg.num_workers):
        batch = to_device(s.make_batch(samples, ctx), device)
        with autocast:
            output, loss = model(batch)
        loss_sum += loss.float() * len(samples)
        n += len(samples)
        if s.accuracy is not None:
            c, k = s.accuracy(output, batch)
            correct += c
            count += k
    model.train()
    out = {"val/loss": (loss_sum / max(n, 1)).item()}
    if s.accuracy is not None and count:
        out["val/accuracy"] = (correct / count).item()
    return out


# ---------------------------------------------------------------------------------------------------- train
def train(
    model: str,
    prep_dir: Path,
    out_dir: Path,
    train_cfg: TrainConfig,
    model_overrides: dict | None = None,
    codebooks: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    experiment: str = "tessera",
    preset: str = "default",
    tags: dict[str, str] | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Train `model` (a tasks/train/table.py name) on prep_dir's shards into out_dir; resume if out_dir holds a run.

    codebooks: {"pixels" | "image" | "mel": path to a saved codebook} for the models that need one.
    parent_run_id: the MLflow parent (flow) run; the training run is nested under it.
    preset: "default" (small, CPU-sized) or "tiny" (tests); model_overrides: any model config field on top.
    init_from: a trained checkpoint of the model the table names in `init` (CLIP: a ViT) whose weights start a
    part of this model (CLIP's image-tower stem); read only on a fresh start, never on resume.
    Returns run_record's: "checkpoint" (best.pt, the best evaluation's weights; ckpt.pt with no val split),
    "last_checkpoint", "run_id", "steps" (run), "planned_steps", "epochs" (run), "planned_epochs", "n_train",
    "stopped_early", "best_step", "best_val", "final_val_loss", "metrics" (the last val/*), "model", "out_dir".
    prep_dir may be an fsspec URL (s3://, gs://, memory://): its shards are streamed from there. out_dir is a local
    folder (under DDP on several machines, one on a filesystem they share).
    """
    if storage.is_remote(out_dir):
        raise ValueError(f"out_dir={out_dir} is a URL; pass a local folder as out_dir (prep_dir may be a URL)")
    if (done := read_success(out_dir)) is not None:
        return done
    job = Job(model, storage.location(prep_dir), Path(out_dir), train_cfg, model_overrides, codebooks, parent_run_id,
              experiment, preset, tags, init_from)
    with cpu_threads(train_cfg.cpu_threads):
        return _train(job)


def _train(job: Job) -> dict:
    env = setup(job.cfg)
    with rng.own_draws(job.cfg.seed + env.rank):  # this thread's draws, whatever trains beside it (models/rng.py)
        return _train_drawing(job, env)


def _train_drawing(job: Job, env: Env) -> dict:
    data = load_data(job)
    job = with_budget(job, env, data)
    ckpt, run_id = resume_point(job, data)
    if ckpt is not None and env.master:
        check_best(job, ckpt)
    state = build_state(job, env, data, ckpt)
    env = measured_precision(job, env, data, state, ckpt)
    if ckpt is not None and job.cfg.max_minutes and ckpt.get("end", job.cfg.max_steps) < job.cfg.max_steps:
        job = replace(job, cfg=replace(job.cfg, max_steps=int(ckpt["end"])))  # where the time cap had moved the end
    with _sigterm_raises(), tracked_run(job, env, run_id) as run:
        report_start(job, env, data, state, run)
        if ckpt is not None:
            restore_rng(env, ckpt, job.cfg.seed)
        meter = start_meter(job, env, data, state)
        job = run_loop(job, env, data, state, run, meter)
        record = report_end(job, env, data, state, run)
    if env.master:  # after the run has ended FINISHED: a marked-finished out_dir never has a RUNNING run
        write_json(job.out_dir / "_SUCCESS", record)
    if env.world > 1:
        dist.barrier()
    return record
