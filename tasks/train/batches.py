"""From prepared samples to a model's batch: the data facts a model needs (stats.json, codebooks) and collation.

`make_batch(samples, ctx)` (one per model, named in tasks/train/table.py) turns the loader's decoded samples
(tasks/data/loader.py: img uint8 (3, S, S) or mel float16 (n_mels, n_frames), info {label_id, text, ...}) into the
model's batch dict (models/: `model(batch) -> (output, loss)`). It runs in the training process, on CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.tokenizer import PAD_ID, ByteTokenizer
from models.vq import Codebook, image_to_tokens, spec_to_tokens
from tasks.data import codebook as codebook_lib
from tasks.infra import storage

TOKENIZER = ByteTokenizer()
CODEBOOKS = ("pixels", "image", "mel")  # colour palette, image-patch codebook, spectrogram-patch codebook


# ---------------------------------------------------------------------------------------------------- data facts
@dataclass
class Codes:
    """A loaded codebook and the patch size its vectors stand for (1 for the colour palette)."""

    codebook: Codebook
    patch: int

    @property
    def k(self) -> int:
        return self.codebook.codes.shape[0]


def load_codebook(path: str | Path, kind: str) -> Codes:
    """A codebook saved by the codebook stage (tasks/data/codebook.py) and the patch size its vectors stand for:
    pixels D=3 (patch 1), image D=P*P*3, mel D=P*P."""
    cb = codebook_lib.load_codebook(path)
    dim = cb.codes.shape[1]
    channels = 1 if kind == "mel" else 3
    patch = math.isqrt(dim // channels)
    if patch * patch * channels != dim:
        raise ValueError(f"codebook {path}: code dimension {dim} is not patch*patch*{channels} for a {kind} codebook")
    return Codes(cb.eval(), patch)


@dataclass
class DataInfo:
    """What the model and its batches need from the prepared data: stats.json and the loaded codebooks."""

    prep_dir: Path
    stats: dict
    codes: dict[str, Codes] = field(default_factory=dict)

    @classmethod
    def load(cls, prep_dir: str | Path, codebooks: dict[str, str] | None = None) -> DataInfo:
        prep_dir = storage.location(prep_dir)  # a folder or an fsspec URL
        stats_path = storage.join(prep_dir, "stats.json")
        if not storage.isfile(stats_path):
            raise FileNotFoundError(f"{stats_path} does not exist: {prep_dir} is not a finished prep folder; "
                                    "run `tessera data` first")
        codes = {kind: load_codebook(p, kind) for kind, p in (codebooks or {}).items()}
        return cls(prep_dir, json.loads(storage.read_text(stats_path)), codes)

    def modality(self, name: str) -> dict:
        if name not in self.stats:
            raise ValueError(f"the prepared data in {self.prep_dir} has no {name} items (stats.json has "
                             f"{sorted(k for k in self.stats if k not in ('counts', 'changes'))})")
        return self.stats[name]

    def n_classes(self, modality: str) -> int:
        return max(1, len(self.modality(modality)["classes"]))

    @property
    def image_size(self) -> int:
        return int(self.modality("image")["size"])

    @property
    def mel_grid(self) -> tuple[int, int]:
        mel = self.modality("audio")["mel"]
        return int(mel["n_mels"]), int(mel["n_frames"])

    def codebook(self, kind: str, model: str = "this model") -> Codes:
        if kind not in self.codes:
            raise ValueError(f"{model} needs the {kind!r} codebook: pass codebooks={{'{kind}': PATH}} "
                             "(the codebook stage writes it)")
        return self.codes[kind]


@dataclass
class BatchContext:
    """Everything make_batch needs: the data facts and the model's config (it sizes tokens and text)."""

    data: DataInfo
    cfg: Any
    mean: torch.Tensor | None = None  # (3, 1, 1) image mean, 0..1 scale
    std: torch.Tensor | None = None

    def __post_init__(self):
        if "image" in self.data.stats:
            img = self.data.stats["image"]
            self.mean = torch.tensor(img["mean"], dtype=torch.float32).view(3, 1, 1)
            self.std = torch.tensor(img["std"], dtype=torch.float32).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------------- collation
def pixels(samples: list[dict]) -> torch.Tensor:
    """uint8 images -> float (B, 3, S, S) in 0..255 (the colour palette's and patch codebook's units)."""
    return torch.from_numpy(np.stack([s["img"] for s in samples])).float()


def images(samples: list[dict], ctx: BatchContext) -> torch.Tensor:
    """uint8 images -> float (B, 3, S, S), normalised with the train split's per-channel mean/std."""
    return (pixels(samples) / 255.0 - ctx.mean) / ctx.std


def mels(samples: list[dict]) -> torch.Tensor:
    """float16 log-mels (already normalised by preprocess) -> float (B, n_mels, n_frames)."""
    return torch.from_numpy(np.stack([s["mel"] for s in samples])).float()


def labels(samples: list[dict]) -> torch.Tensor:
    ids = [int(s["info"].get("label_id", -1)) for s in samples]
    if min(ids) < 0:
        key = samples[ids.index(min(ids))]["__key__"]
        raise ValueError(f"sample {key} has no class label; classifiers need labelled data (image/audio class folders)")
    return torch.tensor(ids, dtype=torch.long)


def texts(samples: list[dict], max_len: int) -> torch.Tensor:
    """Captions/transcripts as byte tokens (B, max_len): EOS-terminated, PAD-padded, truncated to max_len."""
    return TOKENIZER.batch_encode([s["info"].get("text") or "" for s in samples], max_len)


def vit_batch(samples, ctx):
    return {"image": images(samples, ctx), "label": labels(samples)}


def ast_batch(samples, ctx):
    return {"mel": mels(samples), "label": labels(samples)}


def imagegpt_batch(samples, ctx):
    """Colour-palette codes in raster order of the image downsampled (area average) to sqrt(seq_len) pixels a side."""
    side = math.isqrt(ctx.cfg.seq_len)
    x = pixels(samples)  # (B, 3, S, S)
    if x.shape[-1] != side:
        x = F.interpolate(x, size=(side, side), mode="area")  # (B, 3, side, side)
    batch = {"tokens": image_to_tokens(ctx.data.codebook("pixels").codebook, x, patch=1)}  # (B, side^2)
    if ctx.cfg.n_classes:
        batch["label"] = labels(samples)
    return batch


def asr_batch(samples, ctx):
    return {"src": mels(samples), "tgt": texts(samples, ctx.cfg.tgt_len)}


def t2i_batch(samples, ctx):
    codes = ctx.data.codebook("image")
    tgt = image_to_tokens(codes.codebook, pixels(samples), codes.patch)  # (B, (S/P)^2) in raster order
    return {"src": texts(samples, ctx.cfg.src_len), "tgt": tgt}


def tts_batch(samples, ctx):
    codes = ctx.data.codebook("mel")
    return {"src": texts(samples, ctx.cfg.src_len), "tgt": spec_to_tokens(codes.codebook, mels(samples), codes.patch)}


def clip_batch(samples, ctx):
    return {"image": images(samples, ctx), "text": texts(samples, ctx.cfg.context_len)}


# ---------------------------------------------------------------------------------------------------- accuracy
def label_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """Classifiers: (correct, count) of argmax logits (B, C) against batch["label"]."""
    return (output.argmax(-1) == batch["label"]).sum(), len(batch["label"])


def token_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """Teacher-forced next-token accuracy over the non-pad target tokens (logits (B, L, V), tgt (B, L))."""
    real = batch["tgt"] != PAD_ID
    return ((output.argmax(-1) == batch["tgt"]) & real).sum(), int(real.sum())


def retrieval_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """CLIP: image-to-text top-1 within the batch (logits_per_image (B, B); the match is on the diagonal)."""
    return (output.argmax(-1) == torch.arange(len(output), device=output.device)).sum(), len(output)
