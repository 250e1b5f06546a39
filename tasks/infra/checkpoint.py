"""The trainer's checkpoint format and files: save and load (weights only), RNG states, at a path or an fsspec URL.

    out_dir/ckpt.pt     {"model", "config", "state_dict", "optimizer", "step", "epoch", "batch", "rng", "run_id",
                         "train_config", "val", "codebooks", "prep_dir", "best_val", "best_step", "bad_evals",
                         "stopped_early", "clock_s" (seconds trained), "end" (the schedule's end: the time cap
                         may move it), "dtype" (the precision its steps ran in)}: tensors, numbers, strings,
                         lists, dicts; the last checkpoint, resumed from
    out_dir/best.pt     WEIGHTS: the weights of the best evaluation (the model table's `monitor`), what evaluation
                         reads; no optimiser or RNG states
    out_dir/train.json  {"run_id", "checkpoint_step"}: which MLflow run to continue, and whether a ckpt must exist

A checkpoint is written whole or not at all: locally to a temporary file, fsync'ed, then renamed over the old one;
at a remote URL (s3://, gs://, memory://) as one PUT of the final object, which object stores make visible whole or
not at all (both: tasks/infra/storage.py `write_bytes`). It loads only with torch.load(weights_only=True), never a
pickle fallback.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import torch

from models import rng
from tasks.infra import storage

CKPT = "ckpt.pt"
BEST = "best.pt"
STATE = "train.json"
WEIGHTS = ("model", "config", "state_dict", "step", "run_id", "train_config", "val", "codebooks", "prep_dir",
           "init_from")


class CheckpointError(RuntimeError):
    """A checkpoint that should be there to resume from is missing or unreadable."""


def rng_state() -> dict:
    """Torch, CUDA, numpy and Python RNG states as tensors, ints and lists (loadable with weights_only=True), and the
    states of this thread's own generators ("draws", models/rng.py: a training's draws)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "draws": draws.state() if (draws := rng.current()) is not None else {},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if (draws := rng.current()) is not None:
        draws.load(state.get("draws", {}))  # a checkpoint from before them has none: the draws go on from the seed


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """Write `ckpt` atomically: a kill never leaves a half-written checkpoint (see the module docstring)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes(path, buf.getvalue(), fsync=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load(weights_only=True), never a pickle fallback; a missing or unreadable file is a CheckpointError."""
    loc = storage.location(path)
    folder = storage.parent(loc)
    if not storage.isfile(loc):
        raise CheckpointError(f"checkpoint {loc} does not exist, but {storage.join(folder, STATE)} says training "
                              f"reached a checkpoint; delete {folder} to train from scratch")
    try:
        source = io.BytesIO(storage.read_bytes(loc)) if storage.is_url(loc) else loc
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, garbage, or objects outside the weights-only allowlist
        raise CheckpointError(f"checkpoint {loc} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); it was "
                              f"damaged or not written by the trainer (tasks/train/trainer.py); delete {folder} to "
                              "train from scratch") from exc
