"""What a training reads (tasks/train/trainer.py's data and budget sections): stats.json, the codebooks and the model
config they imply with the train and val shard lists (load_data); the train batches as one stream across epochs whose
position a checkpoint keeps (Stream); and the steps planned from the train split's size (with_budget:
tasks/train/budget.py plan_budget).
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import replace
from typing import Iterator

import torch

from tasks.data import loader, shards
from tasks.infra import storage
from tasks.train.batches import BatchContext, DataInfo
from tasks.train.budget import plan_budget
from tasks.train.state import Data, Env, Job, TrainConfig
from tasks.train.table import ITEMS, configure


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
