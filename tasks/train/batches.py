"""From prepared samples to a model's batch: the data facts a model needs (stats.json, codebooks) and collation.

`make_batch(samples, ctx)` (one per model, named in tasks/train/table.py) turns the loader's decoded samples
(tasks/data/loader.py: img uint8 (3, S, S) or mel float16 (n_mels, T), info {label_id, text, ...}) into the
model's batch dict (models/: `model(batch) -> (output, loss)`). It runs in the training process, on CPU.

Clips longer than the window. A stored log-mel has T >= n_frames frames (the window, stats.json; preprocess keeps up
to max_windows windows of a clip). The same functions serve training and evaluation:
- the classifier (AST) trains on a random crop of n_frames (`crop_start`), drawn anew each time the clip is drawn: the
  train loader tags each sample with `draw`, a seed of (seed, epoch, key), so crops are deterministic per seed and
  epoch and a resumed run crops as the uninterrupted one would;
- its evaluation (samples without `draw`: every evaluation reads with train=False) covers the clip with non-overlapping
  windows, the last aligned to the clip's end (`window_starts`), and the model averages its logits over a clip's
  windows (batch["clip_of"], models/ast.py); averaged logits and averaged log-probabilities give the same softmax;
- the speech models (ASR, TTS) read the first window (`mels(samples, n_frames)`): the transcript is the whole clip's.
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
from models.vq import Codebook, image_to_tokens
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


def window_starts(length: int, n_frames: int) -> list[int]:
    """Start frames of the non-overlapping n_frames windows covering a clip of `length` frames, the last aligned to
    the clip's end (overlapping the one before when length is no multiple): (300, 128) -> [0, 128, 172]."""
    if length < n_frames:
        raise ValueError(f"a clip of {length} frames is shorter than the {n_frames}-frame window; "
                         "re-run `tessera data`")
    starts = list(range(0, length - n_frames + 1, n_frames))
    return starts + [length - n_frames] if starts[-1] + n_frames < length else starts


def crop_start(length: int, n_frames: int, draw: int) -> int:
    """A start frame uniform in [0, length - n_frames], from the seed `draw` (0 for a clip of one window)."""
    if length < n_frames:
        raise ValueError(f"a clip of {length} frames is shorter than the {n_frames}-frame window; "
                         "re-run `tessera data`")
    if length == n_frames:
        return 0  # nothing to draw (and no generator to build: most clips)
    return int(np.random.default_rng(draw).integers(0, length - n_frames + 1))


def window(ctx: BatchContext) -> int:
    """The frames a model reads at once: its config's n_frames where it has one, else the data's window."""
    return getattr(ctx.cfg, "n_frames", None) or ctx.data.mel_grid[1]


def mels(samples: list[dict], n_frames: int | None = None) -> torch.Tensor:
    """float16 log-mels (already normalised by preprocess) -> float (B, n_mels, n_frames): each clip's first n_frames
    frames (the speech models' window); n_frames None: the clips as stored, which must then be one length."""
    if n_frames is None and len({s["mel"].shape for s in samples}) > 1:
        raise ValueError(f"clips of {sorted({s['mel'].shape[1] for s in samples})} frames: pass n_frames (the window)")
    return torch.from_numpy(np.stack([s["mel"][:, :n_frames] for s in samples])).float()


def random_crops(samples: list[dict], n_frames: int) -> torch.Tensor:
    """Training: one n_frames crop of each clip, at crop_start(T, n_frames, sample["draw"]) -> float
    (B, n_mels, n_frames)."""
    starts = [crop_start(s["mel"].shape[1], n_frames, s["draw"]) for s in samples]
    return torch.from_numpy(np.stack([s["mel"][:, t:t + n_frames] for s, t in zip(samples, starts)])).float()


def clip_windows(samples: list[dict], n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: every window of every clip (window_starts) -> (float (W, n_mels, n_frames), long (W,) the index
    in samples of the clip each window comes from)."""
    starts = [window_starts(s["mel"].shape[1], n_frames) for s in samples]
    x = np.stack([s["mel"][:, t:t + n_frames] for s, ts in zip(samples, starts) for t in ts])  # (W, n_mels, n_frames)
    clip = torch.tensor([i for i, ts in enumerate(starts) for _ in ts], dtype=torch.long)  # (W,)
    return torch.from_numpy(x).float(), clip


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
    """Drawn for training (every sample has `draw`): one random crop per clip, mel (B, n_mels, n_frames). Otherwise
    every window: mel (W, n_mels, n_frames) and, when some clip has more than one, clip_of (W,) for the model to
    average over."""
    n = window(ctx)
    if all("draw" in s for s in samples):
        return {"mel": random_crops(samples, n), "label": labels(samples)}
    mel, clip = clip_windows(samples, n)
    return {"mel": mel, "label": labels(samples), **({"clip_of": clip} if len(clip) > len(samples) else {})}


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
    return {"src": mels(samples, ctx.data.mel_grid[1]), "tgt": texts(samples, ctx.cfg.tgt_len)}


# Classifier-free guidance (tasks/eval/generate.py): this share of training captions is replaced by the empty caption,
# so the one model also learns p(image) and sampling can push away from it (measured with guidance 3: README).
T2I_CAPTION_DROPOUT = 0.1


def drop_captions(samples: list[dict], share: float) -> list[dict]:
    """Training samples (every one drawn, with `draw`): each caption replaced by "" with probability `share`, from its
    draw seed (a resumed run drops the same ones); evaluation samples (no `draw`) are returned as they are."""
    if share <= 0 or not all("draw" in s for s in samples):
        return samples
    drop = [np.random.default_rng([s["draw"], 1]).random() < share for s in samples]
    return [{**s, "info": {**s["info"], "text": ""}} if d else s for s, d in zip(samples, drop)]


def image_codes(ctx, images: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, S, S) 0..255 -> the image codebook's codes (B, (S/P)^2) in raster order (text-to-image's)."""
    codes = ctx.data.codebook("image")
    return image_to_tokens(codes.codebook, images, codes.patch)


def t2i_batch(samples, ctx):
    return {"src": texts(drop_captions(samples, T2I_CAPTION_DROPOUT), ctx.cfg.src_len),
            "tgt": image_codes(ctx, pixels(samples))}


SPEAKER_KEYS = ("speaker", "voice")  # metadata naming who speaks a clip: --name-pattern's {speaker}, the built-in voice


def speaker(sample: dict) -> str | None:
    """Who speaks the clip (its metadata's first SPEAKER_KEYS field), or None when the data does not say."""
    meta = sample["info"].get("meta") or {}
    return next((str(meta[k]) for k in SPEAKER_KEYS if meta.get(k) not in (None, "")), None)


def voice_partners(samples: list[dict]) -> list[int]:
    """Each clip's voice reference in the batch: another clip of its speaker, drawn from its `draw` seed in training
    and the next one in batch order in evaluation; the clip itself when it is its speaker's only clip in the batch or
    the data names no speakers.

    Why not the clip itself: its mean spectrum carries its words as well as its voice, and a model trained so speaks
    the reference's words at inference ("cross" -> "purple cross"). Measured on the built-in set (round-trip CER, 64
    test transcripts, 800 steps, seeds 0 / 1 / 2): the clip itself 0.42 / 0.49 / 0.35, another clip of the voice
    0.21 / 0.37 / 0.26."""
    who = [speaker(s) for s in samples]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(who):
        if k is not None:
            groups.setdefault(k, []).append(i)
    partners = []
    for i, (s, k) in enumerate(zip(samples, who)):
        group = groups.get(k, [i])
        others = [j for j in group if j != i]
        if not others:
            partners.append(i)
        elif "draw" in s:
            partners.append(others[int(np.random.default_rng([s["draw"], 2]).integers(len(others)))])
        else:
            partners.append(group[(group.index(i) + 1) % len(group)])
    return partners


def tts_batch(samples, ctx):
    """Text-to-speech regresses the first window's normalised log-mel itself (models/tts.py): no codebook. Each clip
    is spoken in the voice of another clip of its speaker (`voice_partners`), batch["ref"]."""
    mel = mels(samples, ctx.data.mel_grid[1])  # (B, n_mels, n_frames)
    return {"src": texts(samples, ctx.cfg.src_len), "mel": mel, "ref": mel[voice_partners(samples)]}


def clip_batch(samples, ctx):
    return {"image": images(samples, ctx), "text": texts(samples, ctx.cfg.context_len)}


# ---------------------------------------------------------------------------------------------------- accuracy
def label_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """Classifiers: (correct, count) of argmax logits (B, C) against batch["label"] (B,), or against the most likely
    class of soft targets (B, C) (mixup, cutmix)."""
    label = batch["label"].argmax(-1) if batch["label"].ndim == 2 else batch["label"]
    return (output.argmax(-1) == label).sum(), len(label)


def token_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """Teacher-forced next-token accuracy over the non-pad target tokens (logits (B, L, V), tgt (B, L))."""
    real = batch["tgt"] != PAD_ID
    return ((output.argmax(-1) == batch["tgt"]) & real).sum(), int(real.sum())


def retrieval_accuracy(output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
    """CLIP: image-to-text top-1 within the batch (logits_per_image (B, B); the match is on the diagonal)."""
    return (output.argmax(-1) == torch.arange(len(output), device=output.device)).sum(), len(output)
