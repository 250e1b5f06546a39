"""The CLIP that builds and queries the index: load it from a trainer checkpoint (a path or an fsspec URL) and embed
images and captions as unit-norm float32 vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.clip import CLIP
from models.tokenizer import ByteTokenizer
from tasks.infra import storage
from tasks.train.table import build_from_checkpoint, with_role


def device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_clip(checkpoint: Path | str, dev: torch.device) -> tuple[CLIP, str]:
    """The CLIP of a trainer checkpoint (tasks/train/table.py `build_from_checkpoint`: weights only) in eval mode on
    `dev`, and the sha256 of the checkpoint's bytes, read before and after the load: the same, or it changed while
    read (a run writing it) and is refused."""
    if not storage.isfile(checkpoint):
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint} does not exist; train one "
                                f"(`tessera train {with_role('image-text')}`)")
    sha = storage.sha256(checkpoint)
    model, ckpt = build_from_checkpoint(checkpoint, map_location=dev)
    if not isinstance(model, CLIP):
        raise ValueError(f"checkpoint {checkpoint} is a {ckpt['model']!r} model, not a CLIP; the index needs a CLIP")
    if model.cfg.tower != "image":
        raise ValueError(f"checkpoint {checkpoint} is a CLIP with an {model.cfg.tower} tower; the index embeds images")
    if storage.sha256(checkpoint) != sha:
        raise RuntimeError(f"checkpoint {checkpoint} changed while it was read (is a run writing it?); try again")
    return model.to(dev), sha


def _autocast(dev: torch.device, bf16: bool):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def embed_images(model: CLIP, images: np.ndarray, mean, std, dev: torch.device, bf16: bool = False) -> np.ndarray:
    """uint8 images (B, 3, S, S) -> unit-norm float32 embeddings (B, E); pixels scaled to 0..1, then (x - mean) / std
    per channel with the prep dir's train statistics (stats.json, 0..1 scale)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).float().div_(255)  # (B, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    with _autocast(dev, bf16):
        z = model.encode_image((x - m) / s, normalize=True)  # (B, E)
    return F.normalize(z.float(), dim=-1).cpu().numpy()


@torch.no_grad()
def embed_texts(model: CLIP, texts: list[str], dev: torch.device, bf16: bool = False) -> np.ndarray:
    """B strings -> unit-norm float32 embeddings (B, E), byte-tokenised to the model's context length."""
    tokens = ByteTokenizer().batch_encode(texts, model.cfg.context_len).to(dev)  # (B, Ls)
    with _autocast(dev, bf16):
        z = model.encode_text(tokens, normalize=True)  # (B, E)
    return F.normalize(z.float(), dim=-1).cpu().numpy()
