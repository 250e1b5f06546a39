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

DDP: under torchrun (WORLD_SIZE > 1) every rank trains on its own shards (webdataset split_by_node); rank 0 alone
evaluates (all of the val split), logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import signal
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tasks.data import loader, shards
from tasks.infra import storage
from tasks.infra import tracking
from tasks.infra.checkpoint import (  # noqa: F401 - CheckpointError, load_checkpoint: re-exported for trainer users
    BEST,
    CKPT,
    STATE,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasks.infra.common import read_success, tree_digest, write_json
from tasks.infra.hardware import compute_dtype, cpu_threads, distributed, peak_flops, pick_device, sync
from tasks.train.augment import DEFAULTS as augment_defaults, settings as augment_settings
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.budget import Budget, Clock, plan_budget
from tasks.train.table import ITEMS, MODEL_MINUTES, MODELS, ModelSpec, configure, spec

LOSS_KEY = "train/loss"
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 600  # optimiser steps; with `epochs`, the cap on them
    epochs: float | None = None  # the budget in passes over the train split (see plan_budget); None: max_steps steps
    min_steps: int = 100  # with `epochs`: the floor on the steps (the cap wins when it is lower)
    patience: int | None = 5  # stop after this many evaluations without a better val metric; None or 0: never
    # wall-clock cap on the training, minutes: the schedule's end moves to the steps that fit (budget.Clock); None: none
    max_minutes: float | None = None
    batch_size: int = 64  # samples per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per step
    lr: float = 1e-3  # peak learning rate, after linear warmup
    min_lr: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 50
    weight_decay: float = 0.05  # on >= 2-D parameters (matrices, embeddings) only
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100
    ckpt_every: int = 100
    log_every: int = 10  # steps between metric flushes to MLflow
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "auto"  # "auto" (bf16 where faster, see hardware.compute_dtype) | "bf16" (autocast) | "fp32"
    compile: bool = False
    num_workers: int = 0  # DataLoader workers (capped at the number of shards)
    shuffle_buffer: int = 1000
    cpu_threads: int = 1  # torch threads on CPU while training; 0: torch's default (see hardware.cpu_threads)
    # the model's train-time augmentation (table `augment`; none for generative models): True its defaults
    # (tasks/train/augment/: VIT_AUG, AST_AUG, ASR_AUG), a dict those settings changed, False none
    augment: bool | dict = True

    def __post_init__(self):
        for name in ("max_steps", "min_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be > 0 (None: a fixed max_steps)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes={self.max_minutes} must be > 0 (None: no time cap)")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"TrainConfig.patience={self.patience} must be >= 0 (0 or None: no early stopping)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig needs 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        if self.cpu_threads < 0:
            raise ValueError(f"TrainConfig.cpu_threads={self.cpu_threads} must be >= 0 (0: torch's default)")
        if not isinstance(self.augment, (bool, dict)):
            raise ValueError(f"TrainConfig.augment={self.augment!r}: use true, false or a dict of settings")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: use 'auto', 'bf16' or 'fp32'")


def default_train_config(model: str, **overrides) -> TrainConfig:
    """TrainConfig with the model's suggested fields (table `train`: an epochs budget and a max_steps cap; the time
    cap MODEL_MINUTES), then `overrides`. max_steps among the overrides without epochs is a step count: it wins over
    the table's epochs."""
    fields = {"max_minutes": MODEL_MINUTES, **spec(model).train, **overrides}
    if "max_steps" in overrides and "epochs" not in overrides:
        fields["epochs"] = None
    cfg = TrainConfig(**fields)
    if isinstance(cfg.augment, dict):  # checked here, before any work: the settings must be the model's
        if spec(model).augment is None:
            raise ValueError(f"{model} has no train-time augmentation to set (augment={cfg.augment}); leave it out")
        augment_settings(augment_defaults[spec(model).augment], cfg.augment)
    return cfg


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: an interrupt, so the MLflow run ends KILLED, not FAILED."""


# ---------------------------------------------------------------------------------------------------- run state
@dataclass(frozen=True)
class Job:
    """One train() call: what to train on which data, where, and how it is reported."""

    model: str
    prep_dir: Any  # a local Path or an fsspec URL (storage.location)
    out_dir: Path
    cfg: TrainConfig
    model_overrides: dict | None = None
    codebooks: dict[str, str] | None = None
    parent_run_id: str | None = None
    experiment: str = "tessera"
    preset: str = "default"
    tags: dict[str, str] | None = None
    init_from: str | Path | None = None
    budget: Budget | None = None  # set once the data is known (plan_budget); cfg.max_steps is then its steps

    @property
    def model_spec(self) -> ModelSpec:
        return spec(self.model)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CKPT

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST


@dataclass(frozen=True)
class Env:
    """Where this process computes: its device and precision, its place among the DDP ranks."""

    device: torch.device
    local_rank: int
    rank: int
    world: int
    dtype: torch.dtype
    autocast: torch.autocast  # bf16 autocast when dtype is bf16, a no-op otherwise; re-entered every step

    @property
    def master(self) -> bool:
        """Rank 0: the one process that evaluates, logs and writes checkpoints."""
        return self.rank == 0


@dataclass
class Data:
    """The prepared data this run reads and the model config that follows from it."""

    info: DataInfo
    model_cfg: Any
    ctx: BatchContext
    train_urls: list[str]
    val_urls: list[str]  # empty: no val split, train without evaluation


@dataclass
class State:
    """What the loop advances and a checkpoint keeps."""

    net: nn.Module  # the model's own parameters (what checkpoints and evaluation use)
    step_model: nn.Module  # net, compiled and/or DDP-wrapped: what the training forward runs through
    opt: torch.optim.Optimizer
    stream: Stream
    step: int = 0  # optimiser steps applied
    val: dict[str, float] = field(default_factory=dict)  # the latest evaluation
    best: dict[str, float] = field(default_factory=dict)  # the best evaluation so far (table `monitor`); {}: none
    best_step: int = 0  # the step of the best evaluation (0: none yet)
    bad_evals: int = 0  # evaluations since the best one (early stopping: TrainConfig.patience)
    stopped: bool = False  # stopped early: bad_evals reached patience
    clock: Clock = field(default_factory=lambda: Clock(None))  # training time against TrainConfig.max_minutes


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


class _NoRun:
    """Stands in for the MLflow run on DDP ranks other than 0 (they log nothing)."""

    run_id, resumed = None, True


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


# ---------------------------------------------------------------------------------------------------- data
class Stream:
    """Endless training batches across epochs; (epoch, batch) is the position of the next batch, for checkpoints."""

    def __init__(self, urls: list[str], cfg: TrainConfig, epoch: int = 0, batch: int = 0):
        self.urls, self.cfg, self.epoch, self.batch = urls, cfg, epoch, batch
        self._it: Iterator[list[dict]] | None = None

    def next(self) -> list[dict]:
        while True:
            if self._it is None:
                self._it = loader.batches(self.urls, self.cfg.batch_size, seed=self.cfg.seed, epoch=self.epoch,
                                          shuffle_buffer=self.cfg.shuffle_buffer, num_workers=self.cfg.num_workers,
                                          start_batch=self.batch)
            samples = next(self._it, None)
            if samples is not None:
                self.batch += 1
                return samples
            if self.batch == 0:
                raise ValueError(f"the train split ({len(self.urls)} shards) has fewer than batch_size="
                                 f"{self.cfg.batch_size} samples on this rank; lower batch_size")
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def load_data(job: Job) -> Data:
    """stats.json and the codebooks, the model config they imply, and the train and val shard lists."""
    info = DataInfo.load(job.prep_dir, job.codebooks)
    model_cfg = configure(job.model, info, job.preset, job.model_overrides)
    modality = job.model_spec.modality
    train_urls = shards.shard_urls(job.prep_dir, modality, "train")
    val_urls = shards.shard_urls(job.prep_dir, modality, "val", allow_empty=True)  # none: train without evaluation
    return Data(info, model_cfg, BatchContext(info, model_cfg), train_urls, val_urls)


# ---------------------------------------------------------------------------------------------------- budget
def count_train(job: Job, data: Data) -> int:
    """Items in the model's train split: stats.json `counts` (preprocess writes it), else the samples in the shards."""
    counts = (data.info.stats.get("counts") or {}).get(job.model_spec.modality) or {}
    if "train" in counts:
        return int(counts["train"])
    return sum(_samples_in(url) for url in data.train_urls)


def _samples_in(url: str) -> int:
    """Samples in one webdataset tar: its distinct keys (a member's name up to the first dot of its base name)."""
    with storage.open(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return len({posixpath.join(posixpath.dirname(m.name), posixpath.basename(m.name).split(".", 1)[0])
                    for m in tar if m.isfile()})


def with_budget(job: Job, env: Env, data: Data) -> Job:
    """The job with its budget planned from the train split's size: cfg.max_steps becomes the planned steps (the
    schedule's end) and cfg.epochs None; rank 0 prints the budget's line."""
    budget = plan_budget(job.cfg, count_train(job, data), env.world)
    if env.master:
        print(budget.line(job.model, ITEMS.get(job.model_spec.modality, "items")), flush=True)
    return replace(job, cfg=replace(job.cfg, max_steps=budget.steps, epochs=None), budget=budget)


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


def model_flops(net: nn.Module, job: Job, model_cfg: Any) -> tuple[float, str]:
    """(training FLOPs per sample, where the figure comes from): the model's own count, else 6 x params x tokens."""
    if hasattr(net, "flops_per_sample"):
        return net.flops_per_sample(train=True), "model"
    n_params = sum(p.numel() for p in net.parameters())
    return 6 * n_params * job.model_spec.tokens(model_cfg), "6*n_params*tokens (estimate)"


def build_state(job: Job, env: Env, data: Data, ckpt: dict | None) -> State:
    """The model (seeded), its optimiser, the data stream; from the checkpoint when resuming, else from init_from."""
    torch.manual_seed(job.cfg.seed)
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
        save_state(job, data, state, run.run_id)
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


# ---------------------------------------------------------------------------------------------------- checkpoint
def _weights(job: Job, data: Data, state: State, run_id: str | None) -> dict:
    """What rebuilds and evaluates the model (build_from_checkpoint): best.pt holds these keys, ckpt.pt more."""
    return {"model": job.model, "config": asdict(data.model_cfg), "state_dict": state.net.state_dict(),
            "step": state.step, "run_id": run_id, "train_config": asdict(job.cfg), "val": state.val,
            "codebooks": {k: str(v) for k, v in (job.codebooks or {}).items()}, "prep_dir": str(job.prep_dir)}


def save_state(job: Job, data: Data, state: State, run_id: str | None) -> None:
    """ckpt.pt (atomically; keys: tasks/infra/checkpoint.py), then train.json naming its step."""
    save_checkpoint(job.ckpt_path, {
        **_weights(job, data, state, run_id), "optimizer": state.opt.state_dict(), "epoch": state.stream.epoch,
        "batch": state.stream.batch, "rng": rng_state(), "best_val": state.best, "best_step": state.best_step,
        "bad_evals": state.bad_evals, "stopped_early": state.stopped, "clock_s": state.clock.spent,
        "end": job.cfg.max_steps,
    })
    write_json(job.out_dir / STATE, {"run_id": run_id, "checkpoint_step": state.step})


def save_best(job: Job, data: Data, state: State, run_id: str | None) -> None:
    """best.pt (atomically): the weights of the best evaluation, written after ckpt.pt of the same step (check_best
    repairs a kill between the two); not resumed from, so no optimiser or RNG states."""
    save_checkpoint(job.best_path, _weights(job, data, state, run_id))


# ---------------------------------------------------------------------------------------------------- report
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
    data = load_data(job)
    job = with_budget(job, env, data)
    ckpt, run_id = resume_point(job, data)
    if ckpt is not None and env.master:
        check_best(job, ckpt)
    state = build_state(job, env, data, ckpt)
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
