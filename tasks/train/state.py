"""What one train() call is made of: its TrainConfig (default_train_config: a model's suggested one), the Job, the
Env it computes in, the Data it reads and the State the loop advances and a checkpoint keeps (tasks/train/trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from tasks.infra.checkpoint import BEST, CKPT
from tasks.train.augment import DEFAULTS as augment_defaults, settings as augment_settings
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.budget import Budget, Clock
from tasks.train.table import MODEL_MINUTES, ModelSpec, spec

if TYPE_CHECKING:
    from tasks.train.feed import Stream


# ---------------------------------------------------------------------------------------------------- config
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
    # the model's train-time augmentation (table `augment`; of the generative models ImageGPT's only): True its
    # defaults (tasks/train/augment/: VIT_AUG, AST_AUG, ASR_AUG, IMAGEGPT_AUG), a dict of those settings, False none
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
