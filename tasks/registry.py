"""The one table of trainable models: what each reads, how it is sized, and how samples become its batch.

    MODELS[name] = ModelSpec(modality, model class, config builder, default/tiny sizes, codebook, make_batch, ...)

A model's config is `configure(data, preset, overrides)`: the preset's sizes (`default` trains in a few minutes on
two CPU cores on the built-in data, `tiny` is for tests), the fields that follow the data (image size, classes,
mel grid, codebook size), then the caller's overrides. `make_batch(samples, ctx)` turns the loader's decoded
samples (tasks/loader.py: img uint8 (3, S, S) or mel float16 (n_mels, n_frames), info {label_id, text, ...}) into
the model's batch dict (models/: `model(batch) -> (output, loss)`). It runs in the training process, on CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.ast import AST, ASTConfig
from models.clip import CLIP, CLIPConfig
from models.imagegpt import ImageGPT, ImageGPTConfig
from models.seq2seq import Seq2Seq, Seq2SeqConfig, audio_to_text_config, text_to_image_config, text_to_speech_config
from models.tokenizer import PAD_ID, ByteTokenizer
from models.vit import ViT, ViTConfig
from models.vq import Codebook, image_to_tokens, spec_to_tokens
from tasks import augment, storage
from tasks import codebook as codebook_lib

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
    """A codebook saved by the codebook stage (tasks/codebook.py) and the patch size its vectors stand for:
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
                             f"{sorted(k for k in self.stats if k != 'counts')})")
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

    def codebook(self, kind: str, model: str) -> Codes:
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
    batch = {"tokens": image_to_tokens(ctx.data.codebook("pixels", "imagegpt").codebook, x, patch=1)}  # (B, side^2)
    if ctx.cfg.n_classes:
        batch["label"] = labels(samples)
    return batch


def asr_batch(samples, ctx):
    return {"src": mels(samples), "tgt": texts(samples, ctx.cfg.tgt_len)}


def t2i_batch(samples, ctx):
    codes = ctx.data.codebook("image", "t2i")
    tgt = image_to_tokens(codes.codebook, pixels(samples), codes.patch)  # (B, (S/P)^2) in raster order
    return {"src": texts(samples, ctx.cfg.src_len), "tgt": tgt}


def tts_batch(samples, ctx):
    codes = ctx.data.codebook("mel", "tts")
    return {"src": texts(samples, ctx.cfg.src_len), "tgt": spec_to_tokens(codes.codebook, mels(samples), codes.patch)}


def clip_batch(samples, ctx):
    return {"image": images(samples, ctx), "text": texts(samples, ctx.cfg.context_len)}


# ---------------------------------------------------------------------------------------------------- augmentation
# Train-time only (tasks/augment.py); the trainer calls them after make_batch when TrainConfig.augment is on.
def vit_augment(batch, ctx):
    return {**batch, "image": augment.shift_flip(batch["image"], VIT_AUG["max_shift"], VIT_AUG["flip"])}


def ast_augment(batch, ctx):
    mel = augment.spec_augment(batch["mel"], freq_mask=AST_AUG["freq_mask"], time_mask=AST_AUG["time_mask"])
    mel, target = augment.mixup(mel, batch["label"], ctx.cfg.n_classes, AST_AUG["mixup"])
    return {**batch, "mel": mel, "label": target}


# Measured on the built-in set (default ViT with the conv stem, 600 steps, test accuracy): flips 0.95, none 0.90,
# flips + 1-pixel shifts 0.71, flips + 4-pixel shifts 0.70, so shifts are off by default. CLIP gets none: flips would
# contradict captions that say "left" and "right", and shifts cost the ViT accuracy.
VIT_AUG = dict(max_shift=0, flip=True)
AST_AUG = dict(freq_mask=16, time_mask=16, mixup=0.0)


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


# ---------------------------------------------------------------------------------------------------- configs
def _vit(d: DataInfo, **kw) -> ViTConfig:
    return ViTConfig(**{"img_size": d.image_size, "n_classes": d.n_classes("image"), **kw})


def _ast(d: DataInfo, **kw) -> ASTConfig:
    n_mels, n_frames = d.mel_grid
    return ASTConfig(**{"n_mels": n_mels, "n_frames": n_frames, "n_classes": d.n_classes("audio"), **kw})


def _imagegpt(d: DataInfo, side: int = 16, **kw) -> ImageGPTConfig:
    """side: pixels a side the image is downsampled to (seq_len = side^2); capped at the image size."""
    side = min(side, d.image_size)
    return ImageGPTConfig(**{"vocab_size": d.codebook("pixels", "imagegpt").k, "seq_len": side * side, **kw})


def _asr(d: DataInfo, **kw) -> Seq2SeqConfig:
    n_mels, n_frames = d.mel_grid
    return audio_to_text_config(**{"n_mels": n_mels, "n_frames": n_frames, **kw})


def _t2i(d: DataInfo, **kw) -> Seq2SeqConfig:
    codes = d.codebook("image", "t2i")
    n_tokens = (d.image_size // codes.patch) ** 2
    return text_to_image_config(codes.k, n_tokens, **kw)


def _tts(d: DataInfo, **kw) -> Seq2SeqConfig:
    codes = d.codebook("mel", "tts")
    n_mels, n_frames = d.mel_grid
    return text_to_speech_config(codes.k, (n_mels // codes.patch) * (n_frames // codes.patch), **kw)


def _clip(d: DataInfo, **kw) -> CLIPConfig:
    return CLIPConfig(**{"img_size": d.image_size, **kw})


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class ModelSpec:
    modality: str  # which prepared shards it reads: "image" or "audio"
    model_cls: type[nn.Module]
    config_cls: type
    config: Callable[..., Any]  # (DataInfo, **sizes) -> config; data-dependent fields first, sizes override
    make_batch: Callable[[list[dict], BatchContext], dict[str, torch.Tensor]]
    tokens: Callable[[Any], int]  # sequence positions per sample (tokens/s)
    inputs: tuple[str, ...]  # the batch keys inference takes (the logged model's inputs, in order)
    default: dict = field(default_factory=dict)  # sizes for the built-in data on two CPU cores
    tiny: dict = field(default_factory=dict)  # sizes for tests
    train: dict = field(default_factory=dict)  # TrainConfig fields that suit this model (tasks/train.py)
    codebook: str | None = None  # "pixels", "image", "mel" or None
    accuracy: Callable[[torch.Tensor, dict], tuple[torch.Tensor, int]] | None = None
    augment: Callable[[dict, BatchContext], dict] | None = None  # train-time augmentation; None: generative models
    init: tuple[str, str, str] | None = None  # (model, its prefix, our prefix): a part that can start from it

    def build(self, cfg) -> nn.Module:
        return self.model_cls(cfg)


SMALL_VIT = dict(dim=128, depth=4, n_heads=4)
TINY_VIT = dict(dim=32, depth=1, n_heads=2)
SMALL_S2S = dict(dim=128, enc_depth=2, dec_depth=3, n_heads=4)
TINY_S2S = dict(dim=32, enc_depth=1, dec_depth=1, n_heads=2)


def _patches(size: int, patch: int, stride: int | None = None) -> int:
    return (size - patch) // (stride or patch) + 1


MODELS: dict[str, ModelSpec] = {
    "vit": ModelSpec(
        "image", ViT, ViTConfig, _vit, vit_batch,
        tokens=lambda c: 1 + _patches(c.img_size, c.patch_size) ** 2,
        inputs=("image",),
        default=dict(SMALL_VIT, patch_size=8, stem="conv"), tiny=dict(TINY_VIT, patch_size=4, stem="conv"),
        train=dict(max_steps=600, batch_size=64, lr=2e-3, min_lr=2e-4, warmup_steps=50, weight_decay=0.05),
        accuracy=label_accuracy, augment=vit_augment,
    ),
    "ast": ModelSpec(
        "audio", AST, ASTConfig, _ast, ast_batch,
        tokens=lambda c: 1 + _patches(c.n_mels, c.patch_size, c.fstride) * _patches(c.n_frames, c.patch_size,
                                                                                    c.tstride),
        inputs=("mel",),
        default=SMALL_VIT, tiny=dict(TINY_VIT, patch_size=16),
        # SpecAugment (16 bins, 16 frames) cost test accuracy at this step budget (0.55 against 0.68), so it is off by
        # default; longer runs turn it on with train_overrides {"ast": {"augment": true}} (and AST_AUG's mixup).
        train=dict(max_steps=400, batch_size=32, lr=5e-4, min_lr=5e-5, warmup_steps=40, weight_decay=0.05,
                   augment=False),
        accuracy=label_accuracy, augment=ast_augment,
    ),
    "imagegpt": ModelSpec(
        "image", ImageGPT, ImageGPTConfig, _imagegpt, imagegpt_batch,
        tokens=lambda c: c.seq_len,
        inputs=("tokens",),
        default=dict(side=16, dim=64, depth=3, n_heads=4), tiny=dict(side=8, **TINY_VIT),
        train=dict(max_steps=300, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=30, weight_decay=0.05),
        codebook="pixels",
    ),
    "asr": ModelSpec(
        "audio", Seq2Seq, Seq2SeqConfig, _asr, asr_batch,
        tokens=lambda c: (c.n_frames + 1) // 2 + c.tgt_len,
        inputs=("src", "tgt"),
        default=dict(SMALL_S2S, tgt_len=24), tiny=dict(TINY_S2S, tgt_len=16),
        train=dict(max_steps=250, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=25, weight_decay=0.05),
        accuracy=token_accuracy,
    ),
    "t2i": ModelSpec(
        "image", Seq2Seq, Seq2SeqConfig, _t2i, t2i_batch,
        tokens=lambda c: c.src_len + c.tgt_len,
        inputs=("src", "tgt"),
        default=dict(SMALL_S2S, src_len=64), tiny=dict(TINY_S2S, src_len=32),
        train=dict(max_steps=300, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=30, weight_decay=0.05),
        codebook="image",
    ),
    "tts": ModelSpec(
        "audio", Seq2Seq, Seq2SeqConfig, _tts, tts_batch,
        tokens=lambda c: c.src_len + c.tgt_len,
        inputs=("src", "tgt"),
        default=dict(SMALL_S2S, src_len=24), tiny=dict(TINY_S2S, src_len=16),
        train=dict(max_steps=400, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=40, weight_decay=0.05),
        codebook="mel",
    ),
    "clip": ModelSpec(
        "image", CLIP, CLIPConfig, _clip, clip_batch,
        tokens=lambda c: 1 + _patches(c.img_size, c.patch_size) ** 2 + c.context_len,
        inputs=("image", "text"),
        # The image tower's convolutional stem starts from the trained ViT's (`init`, the pipeline's default). On the
        # built-in set (test split, zero-shot shape / colour / colour+shape, 36 classes): from scratch 0.26 / 0.97 /
        # 0.35 (colour, size and position tell captions apart, so shape is never needed); whole tower from the ViT
        # 0.82 / 0.21 / 0.16 (the ViT learned to ignore colour); stem only, 600 steps 0.84 / 0.46 / 0.56.
        default=dict(embed_dim=64, patch_size=8, vision_stem="conv", vision_dim=128, vision_depth=4, vision_heads=4,
                     text_dim=96, text_depth=2, text_heads=4, context_len=64),
        tiny=dict(embed_dim=16, patch_size=4, vision_stem="conv", vision_dim=32, vision_depth=1, vision_heads=2,
                  text_dim=32, text_depth=1, text_heads=2, context_len=32),
        train=dict(max_steps=600, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=60, weight_decay=0.1),
        accuracy=retrieval_accuracy, init=("vit", "encoder.patch_embed.", "visual.patch_embed."),
    ),
}

PRESETS = ("default", "tiny")


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def configure(name: str, data: DataInfo, preset: str = "default", overrides: dict | None = None):
    """The model config: the data's fields, then the preset's sizes, then `overrides` (any config field)."""
    s = spec(name)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    sizes = {**getattr(s, preset), **(overrides or {})}
    try:
        return s.config(data, **sizes)
    except TypeError as exc:  # an unknown field name
        raise ValueError(f"bad {name} config overrides {overrides}: {exc}") from None


def build_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the trained model of a trainer checkpoint (tasks/train.py) -> (model in eval mode, checkpoint dict).

    The checkpoint is read with weights_only=True; `ckpt["config"]` rebuilds the config (whisper's
    `ModelDimensions(**checkpoint["dims"])`), `ckpt["codebooks"]` names the codebook files its batches need.
    """
    from tasks.checkpoint import load_checkpoint  # the trainer's checkpoint format

    ckpt = load_checkpoint(path, map_location=map_location)  # a path or an fsspec URL
    s = spec(ckpt["model"])
    model = s.build(s.config_cls(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
