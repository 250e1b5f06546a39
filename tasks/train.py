"""One trainer for every model in tasks/registry.py, in nanoGPT's sections.

    train(model, prep_dir, out_dir, TrainConfig(...)) -> {"checkpoint", "run_id", "steps", "final_val_loss", "metrics"}

setup (device, precision, DDP) -> data (shards -> make_batch) -> model + AdamW -> resume -> MLflow run -> loop:
    lr = get_lr(step); grad_accum micro-batches (bf16 autocast where it pays, DDP no_sync but the last); clip; step;
    metrics buffered, sent every log_every steps; eval on the val split every eval_every steps; checkpoint every
    ckpt_every steps and at the end.

A run that dies ends its MLflow run FAILED, or KILLED on Ctrl-C or SIGTERM (a handler turns SIGTERM into an
exception while training runs in the main thread); it is never left RUNNING, except by SIGKILL, which resuming ends.

Resume: `out_dir/ckpt.pt` (written atomically) holds the weights, the optimiser, the step, the data position
(epoch, batch) and every RNG state; `out_dir/train.json` holds the MLflow run id from the moment the run exists.
Calling train() again with the same out_dir after a crash or kill continues that run from the checkpoint: the data
order depends only on (seed, epoch), so on CPU the resumed losses equal the uninterrupted ones step for step, and
metric steps an earlier attempt had already sent are not sent twice. `out_dir/_SUCCESS` marks a finished run; train()
then returns its record without training. Checkpoints load only with torch.load(weights_only=True).

DDP: under torchrun (WORLD_SIZE > 1) every rank trains on its own shards (webdataset split_by_node); rank 0 alone
evaluates (all of the val split), logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tasks import loader, storage, tracking
from tasks.checkpoint import (  # noqa: F401 - CheckpointError, load_checkpoint: re-exported for tasks.train users
    CKPT,
    STATE,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tasks.common import read_success, tree_digest, write_json
from tasks.registry import MODELS, BatchContext, DataInfo, configure, spec

LOSS_KEY = "train/loss"
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 600  # optimiser steps
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
    precision: str = "auto"  # "auto" (bf16 where faster, see compute_dtype) | "bf16" (autocast) | "fp32"
    compile: bool = False
    num_workers: int = 0  # DataLoader workers (capped at the number of shards)
    shuffle_buffer: int = 1000
    cpu_threads: int = 1  # torch threads on CPU while training; 0: torch's default (one per core). See below.
    augment: bool = True  # the model's train-time augmentation (registry `augment`; none for generative models)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig needs 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device={self.device!r}: use 'auto', 'cpu' or 'cuda'")
        if self.cpu_threads < 0:
            raise ValueError(f"TrainConfig.cpu_threads={self.cpu_threads} must be >= 0 (0: torch's default)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: use 'auto', 'bf16' or 'fp32'")


def default_train_config(model: str, **overrides) -> TrainConfig:
    """TrainConfig with the model's suggested fields (registry `train`), then `overrides`."""
    return TrainConfig(**{**spec(model).train, **overrides})


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: an interrupt, so the MLflow run ends KILLED, not FAILED."""


# ---------------------------------------------------------------------------------------------------- schedule
def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps (min_lr after)."""
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


# ---------------------------------------------------------------------------------------------------- hardware
_PEAK_FLOPS: dict[tuple[str, torch.dtype, int], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured matrix-product FLOP/s of this device and dtype, measured once per process.

    Square products of growing size (256 .. 4096), each timed over enough repeats to last ~0.05 s; sizes stop
    growing before one product would take over 0.25 s (a CPU without bf16 instructions emulates bf16 at ~1 GFLOP/s,
    where a 4096^3 product takes minutes). Inputs are constants, not random: measuring must not move the RNG
    streams a resumed run reproduces. On a CPU shared with other processes the figure, and so MFU, is approximate.
    """
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _PEAK_FLOPS:
        best = 0.0
        for n in (256, 512, 1024, 2048, 4096):
            a = torch.full((n, n), 0.5, device=device, dtype=dtype)
            b = torch.full((n, n), 0.25, device=device, dtype=dtype)
            t0 = time.perf_counter()
            a @ b  # warm-up, and a first estimate of the time per product
            _sync(device)
            one = time.perf_counter() - t0
            reps = max(1, min(50, int(0.05 / max(one, 1e-6))))
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            _sync(device)
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
            if one * 8 > 0.25:  # the next size does 8x the work
                break
        _PEAK_FLOPS[key] = best
    return _PEAK_FLOPS[key]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 or fp32 as asked; "auto" takes bf16 where the device computes it faster.

    CUDA: bf16 when the GPU supports it. CPU: bf16 only if its measured matmul peak beats fp32's by 1.5x: CPUs with
    AVX512-BF16/AMX run bf16 ~4x faster than fp32, but an AVX2-only CPU emulates it ~50x slower.
    """
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    fast = peak_flops(device, torch.bfloat16) > 1.5 * peak_flops(device, torch.float32)
    return torch.bfloat16 if fast else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group under torchrun (NCCL for CUDA devices, gloo for CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("TrainConfig.device='cuda' but no CUDA device is visible; use device='auto' or 'cpu'")
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts of the model (not under autocast)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


# ---------------------------------------------------------------------------------------------------- run state
class _NullMetrics:
    skip_through = -1

    def add(self, metrics: dict, step: int) -> None:
        pass

    def flush(self, wait: bool = True) -> None:
        pass


class _NoRun:
    """Stands in for the MLflow run on DDP ranks other than 0 (they log nothing)."""

    run_id, resumed, metrics = None, True, _NullMetrics()


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


def init_part(net: nn.Module, model: str, path: Path) -> int:
    """Copy the weights of a trained checkpoint into the part of `net` the registry's `init` names (CLIP's image
    tower starts from the trained ViT's convolutional stem, see registry.py). Returns the number of tensors copied."""
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


def _read_state(out_dir: Path) -> dict:
    path = out_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


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
    register: bool = False,
    tags: dict[str, str] | None = None,
    init_from: str | Path | None = None,
) -> dict:
    """Train `model` (a tasks/registry.py name) on prep_dir's shards into out_dir; resume if out_dir holds a run.

    codebooks: {"pixels" | "image" | "mel": path to a saved codebook} for the models that need one.
    parent_run_id: the MLflow parent (flow) run; the training run is nested under it.
    preset: "default" (small, CPU-sized) or "tiny" (tests); model_overrides: any model config field on top.
    register: log the final model to MLflow and register it as "tessera-{model}".
    init_from: a trained checkpoint of the model the registry names in `init` (CLIP: a ViT) whose weights start a
    part of this model (CLIP's image-tower stem); read only on a fresh start, never on resume.
    Returns {"checkpoint", "run_id", "steps", "final_val_loss", "metrics", "model", "out_dir"}.
    prep_dir may be an fsspec URL (s3://, gs://, memory://): its shards are streamed from there. out_dir is a local
    folder (under DDP on several machines, one on a filesystem they share).
    """
    if storage.is_remote(out_dir):
        raise ValueError(f"out_dir={out_dir} is a URL; pass a local folder as out_dir (prep_dir may be a URL)")
    if (done := read_success(out_dir)) is not None:
        return done
    with cpu_threads(train_cfg.cpu_threads):
        return _train(model, storage.location(prep_dir), Path(out_dir), train_cfg, model_overrides, codebooks,
                      parent_run_id, experiment, preset, register, tags, init_from)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count for the duration of a run (0: leave it), restored afterwards.

    Measured on the project's shared two-core machines (2026-11-29), a default-size ViT step (batch 64): one thread
    470 ms, two threads 2200 ms (every OpenMP barrier waits for a thread another process has descheduled; 700 ms
    with OMP_WAIT_POLICY=PASSIVE). On a machine of its own, cpu_threads=0 uses every core.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(model, prep_dir, out_dir, cfg, model_overrides, codebooks, parent_run_id, experiment, preset, register,
           tags, init_from=None) -> dict:
    s = spec(model)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(cfg.device, local_rank)
    rank, world = _distributed(device)
    master = rank == 0
    dtype = compute_dtype(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    # ---- data
    data = DataInfo.load(prep_dir, codebooks)
    model_cfg = configure(model, data, preset, model_overrides)
    ctx = BatchContext(data, model_cfg)
    train_urls = loader.shard_urls(prep_dir, s.modality, "train")
    try:
        val_urls = loader.shard_urls(prep_dir, s.modality, "val")
    except FileNotFoundError:
        val_urls = []  # no val split (val_fraction=0): train without evaluation

    # ---- resume?
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(out_dir)
    ckpt_path = out_dir / CKPT
    ckpt = load_checkpoint(ckpt_path) if state.get("checkpoint_step") or ckpt_path.exists() else None
    if ckpt is not None and (ckpt["model"] != model or ckpt["config"] != asdict(model_cfg)):
        raise CheckpointError(f"{ckpt_path} holds a {ckpt['model']} with config {ckpt['config']}, not this "
                              f"{model} {asdict(model_cfg)}; use another out_dir or delete {out_dir}")

    # ---- model and optimiser
    torch.manual_seed(cfg.seed)
    net = s.build(model_cfg).to(device)
    opt = make_optimizer(net, cfg, device)
    step, epoch, batch_pos, val = 0, 0, 0, {}
    if ckpt is not None:
        net.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_pos, val = ckpt["step"], ckpt["epoch"], ckpt["batch"], dict(ckpt["val"])
    elif init_from is not None:
        init_part(net, model, Path(init_from))
    step_model: nn.Module = torch.compile(net) if cfg.compile else net
    if world > 1:
        step_model = DDP(step_model, device_ids=[local_rank] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in net.parameters())
    tokens = s.tokens(model_cfg)
    flops = net.flops_per_sample(train=True) if hasattr(net, "flops_per_sample") else 6 * n_params * tokens
    stream = Stream(train_urls, cfg, epoch, batch_pos)

    def checkpoint(run_id: str | None) -> None:
        save_checkpoint(ckpt_path, {
            "model": model, "config": asdict(model_cfg), "state_dict": net.state_dict(),
            "optimizer": opt.state_dict(), "step": step, "epoch": stream.epoch, "batch": stream.batch,
            "rng": rng_state(), "run_id": run_id, "train_config": asdict(cfg), "val": val,
            "codebooks": {k: str(v) for k, v in (codebooks or {}).items()}, "prep_dir": str(prep_dir),
        })
        write_json(out_dir / STATE, {"run_id": run_id, "checkpoint_step": step})

    run_cm = (tracking.start_run(experiment, f"train-{model}", parent_run_id, state.get("run_id"), tags)
              if master else contextlib.nullcontext(_NoRun()))
    with _sigterm_raises(), run_cm as run:
        if master and not run.resumed:
            write_json(out_dir / STATE, {"run_id": run.run_id, "checkpoint_step": 0})
            run.log_params({"model": model, "preset": preset, "n_params": n_params, "world_size": world,
                            "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                            "flops_per_sample": flops, "flops_source": "model" if hasattr(net, "flops_per_sample")
                            else "6*n_params*tokens (estimate)", "train": asdict(cfg), "config": asdict(model_cfg)})
            run.set_tags({"tessera.model": model, "tessera.out_dir": str(out_dir)})
            prep = read_success(prep_dir) or {}
            run.log_dataset(f"prep/{s.modality}", prep.get("digest") or tree_digest(prep_dir)[:32], str(prep_dir))
        elif master:
            run.metrics.skip_through = run.last_step(LOSS_KEY)  # steps an earlier attempt had already sent
        if ckpt is not None:
            set_rng_state(ckpt["rng"])  # last: nothing after this may draw from the RNGs before the next step
            if rank:
                torch.manual_seed(cfg.seed + rank + step)
        peak = peak_flops(device, dtype) * world if master else 0

        t0, window = time.perf_counter(), 0
        net.train()
        while step < cfg.max_steps:
            # ---- one optimiser step: accumulate grad_accum micro-batches, clip, step
            lr = get_lr(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = s.make_batch(stream.next(), ctx)
                if cfg.augment and s.augment is not None:
                    batch = s.augment(batch, ctx)
                batch = to_device(batch, device)
                sync = micro == cfg.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else step_model.no_sync()), autocast:
                    _, loss = step_model(batch)
                    loss = loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.metrics.add({LOSS_KEY: loss_sum, "train/lr": lr, "train/grad_norm": grad_norm}, step)
            step += 1
            window += 1
            last = step == cfg.max_steps

            # ---- log, evaluate, checkpoint
            if master and (step % cfg.log_every == 0 or last):
                _sync(device)
                dt = time.perf_counter() - t0
                sps = window * cfg.batch_size * cfg.grad_accum * world / dt
                run.metrics.add({"perf/samples_per_s": sps, "perf/tokens_per_s": sps * tokens,
                                 "perf/mfu": sps * flops / peak if peak else 0.0, "data/epoch": stream.epoch}, step - 1)
                print(f"[{model}] step {step}/{cfg.max_steps} loss {loss_sum.item():.4f} lr {lr:.2e} "
                      f"{sps:.0f} samples/s mfu {sps * flops / peak if peak else 0:.1%}", flush=True)
                run.metrics.flush(wait=False)  # in the background; the flush before a checkpoint waits for it
            if master and val_urls and (step % cfg.eval_every == 0 or last):
                val = evaluate(net, val_urls, ctx, model, cfg, device, autocast)
                run.metrics.add(val, step - 1)
            if master and (step % cfg.ckpt_every == 0 or last):
                run.metrics.flush()
                checkpoint(run.run_id)
            if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step % cfg.ckpt_every == 0:
                t0, window = time.perf_counter(), 0  # throughput leaves out eval and checkpoint time

        record = {"checkpoint": str(ckpt_path), "run_id": run.run_id, "steps": step, "model": model,
                  "out_dir": str(out_dir), "final_val_loss": val.get("val/loss"),
                  "metrics": {k: float(v) for k, v in val.items()}}
        if master:
            run.client.log_artifact(run.run_id, str(ckpt_path), artifact_path="checkpoint")
            if register:
                example = s.make_batch(next(iter(loader.batches(val_urls or train_urls, 2, train=False))), ctx)
                record["registered"] = tracking.log_model(net.cpu(), "model", f"tessera-{model}", run.run_id,
                                                          {k: example[k] for k in s.inputs})
    if master:  # after the run has ended FINISHED: a marked-finished out_dir never has a RUNNING run
        write_json(out_dir / "_SUCCESS", record)
    if world > 1:
        dist.barrier()
    return record
