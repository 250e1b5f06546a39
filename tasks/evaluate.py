"""Evaluate trained checkpoints on a prepared split: paths in, {"metrics", "artifacts", "summary"} out.

    evaluate(model, checkpoint, prep_dir, out_dir, codebooks, split, max_samples)
        vit, ast        accuracy, top-5, per-class table (CSV + markdown), confusion matrix PNG, held-out combos
        imagegpt        held-out bits/token (teacher forced) + a grid of unconditional samples
        t2i             held-out bits/token + images generated from test captions (decoded through the codebook)
        tts             held-out bits/token + speech from test transcripts (codebook -> mel -> Griffin-Lim) as WAVs
        asr             CER and WER of greedy transcripts + an examples table
        clip            zero-shot accuracy (shape, colour, colour+shape; prompt ensembles) + recall@1/5/10 both ways
Round trips across modalities (scored by the other trained models) are in tasks/roundtrip.py.

Artifacts go into out_dir atomically (tasks.common.atomic_dir) with metrics.json and summary.md; the caller (the
pipeline's task wrapper) logs them. Everything runs under torch.no_grad, in fp32 by default: CPU bf16 autocast
measured 2-7x slower here for these model sizes (casts dominate the small matmuls); PRECISION = "bf16" turns it on
for the forward passes and generation (never for the teacher-forced NLL, where bf16 logits would move bits/token in
the second decimal, nor Griffin-Lim). Images are sampled (ImageGPT at
temperature 1, t2i at temperature 1 with top-k, as Parti) from a seeded generator: greedy image decoding collapses to
blank backgrounds, a background patch being the likeliest code almost everywhere. Speech and transcripts are greedy.
"""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.vq import tokens_to_image  # noqa: E402
from tasks import audio_out, loader  # noqa: E402
from tasks.common import atomic_dir, write_json  # noqa: E402
from tasks.registry import TOKENIZER, BatchContext, DataInfo, build_from_checkpoint, mels, spec  # noqa: E402
from tasks.metrics import (  # noqa: E402
    cer, classification_metrics, hit_rates, is_heldout, label_sets, retrieval_recall, wer, zero_shot_weights,
)

BATCH_SIZE = 64
N_SHOW = 8  # generated samples per grid / WAVs per model
N_EXAMPLES = 10  # rows of the ASR examples table
SEED = 0
T2I_TOP_K = 32  # codes kept when sampling t2i images


PRECISION = "fp32"  # or "bf16": CPU autocast for forward passes and generation


def _amp():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")


# ---------------------------------------------------------------------------------------------------- artifacts
def _table(header: Sequence[str], rows: list[Sequence]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def _csv(path: Path, header: Sequence[str], rows: list[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _confusion_plot(cm: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    n = len(classes)
    frac = cm.float() / cm.sum(dim=1, keepdim=True).clamp_min(1)  # row-normalised
    fig, ax = plt.subplots(figsize=(min(2 + 0.6 * n, 14), min(1.6 + 0.6 * n, 13)))
    ax.imshow(frac.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def image_grid(images: torch.Tensor, titles: list[str], path: Path, ncols: int = N_SHOW) -> None:
    """Pixels (N, 3, H, W) in 0..255 -> a PNG grid, each image with its (wrapped) title above it."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.8 * ncols, 2.2 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].clamp(0, 255).byte().permute(1, 2, 0).numpy(), interpolation="nearest")
            lines = [w for line in titles[i].split("\n") for w in textwrap.wrap(line, 24)]
            ax.set_title("\n".join(lines[:5]), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- evaluation
def load_model(checkpoint: Path, prep_dir: Path, codebooks: dict[str, str] | None = None, expect: str | None = None):
    """A trainer checkpoint -> (name, model in eval mode, BatchContext on prep_dir's stats and the model's codebook).

    codebooks default to the paths the checkpoint recorded at training time."""
    model, ckpt = build_from_checkpoint(checkpoint)
    name = ckpt["model"]
    if expect is not None and name != expect:
        raise ValueError(f"{checkpoint} holds a {name} model, not a {expect}")
    need = spec(name).codebook
    paths = {**(ckpt.get("codebooks") or {}), **(codebooks or {})}
    if need and need not in paths:
        raise ValueError(f"{name} needs the {need!r} codebook: pass codebooks={{'{need}': PATH}}")
    return name, model, BatchContext(DataInfo.load(prep_dir, {need: paths[need]} if need else {}), model.cfg)


@dataclass
class Run:
    """One evaluation: the model, its batch context, the split to read and the folder the artifacts go to."""

    name: str
    model: torch.nn.Module
    ctx: BatchContext
    split: str
    max_samples: int | None
    out: Path

    def samples(self, limit: int | None = None) -> Iterator[list[dict]]:
        """Decoded samples of the split in file order, in batches, at most min(limit, max_samples) in all."""
        caps = [c for c in (limit, self.max_samples) if c is not None]
        left = min(caps) if caps else math.inf
        if left < 1:
            raise ValueError(f"max_samples={self.max_samples} leaves nothing to evaluate; use None or >= 1")
        urls = loader.shard_urls(self.ctx.data.prep_dir, spec(self.name).modality, self.split)
        for batch in loader.batches(urls, BATCH_SIZE, train=False, split_nodes=False):
            yield batch[: int(min(left, len(batch)))]
            left -= len(batch)
            if left <= 0:
                return

    def first(self, n: int | None = None) -> list[dict]:
        return [s for b in self.samples(n) for s in b]

    def batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return spec(self.name).make_batch(samples, self.ctx)


def eval_classifier(run: Run) -> tuple[dict, list[str]]:
    logits, labels, heldout = [], [], []
    for samples in run.samples():
        batch = run.batch(samples)
        with _amp():
            logits.append(run.model(batch)[0].float())
        labels.append(batch["label"])
        heldout += [is_heldout(s["info"].get("meta") or {}) for s in samples]
    logits, labels, heldout = torch.cat(logits), torch.cat(labels), torch.tensor(heldout, dtype=torch.bool)
    classes = run.ctx.data.modality(spec(run.name).modality)["classes"]
    metrics, rows, cm = classification_metrics(logits, labels, classes)
    metrics["n"] = float(len(labels))
    if heldout.any():
        metrics["heldout_accuracy"] = (logits[heldout].argmax(-1) == labels[heldout]).float().mean().item()
        metrics["n_heldout"] = float(heldout.sum())
    _csv(run.out / "per_class.csv", ("class", "n", "accuracy"), rows)
    (run.out / "per_class.md").write_text(_table(("class", "n", "accuracy"), rows) + "\n")
    title = f"{run.name} on {run.split}: accuracy {metrics['accuracy']:.3f}"
    _confusion_plot(cm, classes, run.out / "confusion.png", title)
    return metrics, ["### Per class", _table(("class", "n", "accuracy"), rows)]


def nll_bits(run: Run) -> dict[str, float]:
    """Teacher-forced negative log-likelihood over the split, in bits per target token (fp32)."""
    pad = getattr(run.model.cfg, "pad_id", -100)
    nats, count = 0.0, 0
    for samples in run.samples():
        batch = run.batch(samples)
        tgt = batch["tokens"] if "tokens" in batch else batch["tgt"]  # (B, L)
        logits, _ = run.model(batch)  # (B, L, V)
        nats += F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=pad, reduction="sum").item()
        count += int((tgt != pad).sum())
    nll = nats / max(1, count)
    return {"bits_per_token": nll / math.log(2), "nll_nats": nll, "n_tokens": float(count)}


def eval_imagegpt(run: Run) -> tuple[dict, list[str]]:
    cfg, codes = run.model.cfg, run.ctx.data.codebook("pixels", "imagegpt")
    side = math.isqrt(cfg.seq_len)
    label = torch.arange(N_SHOW) % cfg.n_classes if cfg.n_classes else None
    with _amp():
        tokens = run.model.generate(N_SHOW, temperature=1.0, label=label, generator=torch.Generator().manual_seed(SEED))
    images = tokens_to_image(codes.codebook, tokens, 1, side, side)  # (N, 3, side, side) palette colours, 0..255
    image_grid(images, [f"sample {i}" for i in range(N_SHOW)], run.out / "samples.png")
    return nll_bits(run), []


def generate_images(model, ctx: BatchContext, captions: list[str]) -> torch.Tensor:
    """t2i: captions -> pixels (N, 3, S, S) in 0..255, sampled codes decoded through the image-patch codebook."""
    codes, size = ctx.data.codebook("image", "t2i"), ctx.data.image_size
    src, g = TOKENIZER.batch_encode(captions, model.cfg.src_len), torch.Generator().manual_seed(SEED)
    with _amp():
        tokens = model.generate(src, temperature=1.0, top_k=T2I_TOP_K, generator=g)  # (N, (S/P)^2)
    return tokens_to_image(codes.codebook, tokens, codes.patch, size, size).clamp(0, 255)


def eval_t2i(run: Run) -> tuple[dict, list[str]]:
    samples = run.first(N_SHOW)
    captions = [s["info"].get("text") or "" for s in samples]
    generated = generate_images(run.model, run.ctx, captions)
    reference = torch.from_numpy(np.stack([s["img"] for s in samples])).float()  # (N, 3, S, S) 0..255
    image_grid(torch.cat([generated, reference]), captions + ["(reference)"] * len(samples), run.out / "samples.png",
               ncols=len(samples))
    return nll_bits(run), []


def eval_tts(run: Run) -> tuple[dict, list[str]]:
    samples = run.first(N_SHOW)
    texts = [s["info"].get("text") or "" for s in samples]
    with _amp():
        generated, reference = audio_out.generate_speech(run.model, run.ctx, texts), mels(samples)
    sr = audio_out.mel_config(run.ctx.data.stats).sample_rate
    for prefix, mel in (("generated", generated), ("reference", reference)):  # reference: the vocoder's ceiling
        audio_out.write_wavs(audio_out.vocode(run.ctx.data.stats, mel), sr, run.out / "wav", prefix)
    audio_out.spectrogram_plot(generated, reference, texts, run.out / "spectrograms.png")
    rows = [(f"generated_{i:02d}.wav", t) for i, t in enumerate(texts)]
    return nll_bits(run), ["### Generated speech", _table(("file", "transcript"), rows)]


def transcribe(model, mel: torch.Tensor) -> list[str]:
    """asr: normalised log-mel (N, n_mels, n_frames) -> greedy transcripts."""
    with _amp():
        return TOKENIZER.batch_decode(model.generate(mel, temperature=0.0))


def eval_asr(run: Run) -> tuple[dict, list[str]]:
    refs, hyps = [], []
    for samples in run.samples():
        refs += [s["info"].get("text") or "" for s in samples]
        hyps += transcribe(run.model, mels(samples))
    rows = list(zip(refs, hyps))[:N_EXAMPLES]
    (run.out / "examples.md").write_text(_table(("reference", "hypothesis"), rows) + "\n")
    metrics = {"cer": cer(refs, hyps), "wer": wer(refs, hyps), "n": float(len(refs))}
    return metrics, ["### Examples", _table(("reference", "hypothesis"), rows)]


def encode_texts(clip) -> Callable[[list[str]], torch.Tensor]:
    """CLIP's text tower as list of N strings -> (N, E), each distinct string encoded once (label sets share them)."""
    cache: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(new), 4 * BATCH_SIZE):
            chunk = new[i : i + 4 * BATCH_SIZE]
            with _amp():
                cache.update(zip(chunk, clip.encode_text(TOKENIZER.batch_encode(chunk, clip.cfg.context_len)).float()))
        return torch.stack([cache[t] for t in texts])
    return encode


def zero_shot_classifiers(clip) -> dict[str, tuple[list[str], torch.Tensor]]:
    """{label set: (class names, weights (E, C))} for every label set of label_sets()."""
    encode = encode_texts(clip)
    return {name: (classes, zero_shot_weights(encode, p)) for name, (classes, p) in label_sets().items()}


def zero_shot(clip, images: torch.Tensor, classifiers: dict) -> tuple[dict[str, list[str]], torch.Tensor]:
    """Normalised images (N, 3, H, W) -> ({label set: predicted class name per image}, image embeddings (N, E))."""
    with _amp():
        z = clip.encode_image(images, normalize=True).float()  # (N, E), unit norm
    return {name: [classes[i] for i in (z @ w).argmax(-1).tolist()] for name, (classes, w) in classifiers.items()}, z


def eval_clip(run: Run) -> tuple[dict, list[str]]:
    img, txt, metas, preds = [], [], [], {}
    classifiers = zero_shot_classifiers(run.model)
    for samples in run.samples():
        batch = run.batch(samples)
        pred, z = zero_shot(run.model, batch["image"], classifiers)
        for k, v in pred.items():
            preds.setdefault(k, []).extend(v)
        img.append(z)
        with _amp():
            txt.append(run.model.encode_text(batch["text"], normalize=True).float())
        metas += [s["info"].get("meta") or {} for s in samples]
    truth = {"shape": [m.get("shape") for m in metas], "colour": [m.get("colour") for m in metas]}
    truth["combo"] = [f"{c} {s}" if s and c else None for s, c in zip(truth["shape"], truth["colour"])]
    rows = hit_rates(preds, truth, [is_heldout(m) for m in metas])
    metrics = {"n": float(len(metas))}
    metrics.update({f"zero_shot/{k}_{'' if sub == 'all' else 'heldout_'}accuracy": acc for k, sub, _, acc in rows})
    sim = torch.cat(img) @ torch.cat(txt).T  # (N, N) image i against caption j
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        for k, r in retrieval_recall(s).items():
            metrics[f"retrieval/{direction}_recall_at_{k}"] = r
    return metrics, ["### Zero-shot", _table(("label set", "subset", "n", "accuracy"), rows)]


EVALUATORS: dict[str, Callable[[Run], tuple[dict, list[str]]]] = {
    "vit": eval_classifier, "ast": eval_classifier, "imagegpt": eval_imagegpt, "t2i": eval_t2i, "tts": eval_tts,
    "asr": eval_asr, "clip": eval_clip,
}


def _finish(tmp: Path, record: dict, title: str, metrics: dict, sections: list[str]) -> str:
    """metrics.json + summary.md into tmp, metrics and artifacts into the _SUCCESS record; returns the summary."""
    summary = "\n\n".join([f"## {title}", _table(("metric", "value"), list(metrics.items())), *sections]) + "\n"
    write_json(tmp / "metrics.json", metrics)
    (tmp / "summary.md").write_text(summary)
    record.update(metrics=metrics, artifacts=sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
    return summary


@torch.no_grad()
def evaluate(model: str, checkpoint: Path, prep_dir: Path, out_dir: Path, codebooks: dict[str, str] | None = None,
             split: str = "test", max_samples: int | None = None) -> dict:
    """Evaluate a trainer checkpoint of `model` on `split` of prep_dir; artifacts into out_dir (atomically).

    Returns {"metrics": {name: float}, "artifacts": [paths relative to out_dir], "summary": markdown}."""
    if model not in EVALUATORS:
        raise ValueError(f"no evaluation for model {model!r}; choose one of {', '.join(EVALUATORS)}")
    name, net, ctx = load_model(Path(checkpoint), Path(prep_dir), codebooks, expect=model)
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        metrics, sections = EVALUATORS[model](Run(name, net, ctx, split, max_samples, tmp))
        summary = _finish(tmp, record, f"{model} on {split}", metrics, sections)
    return {**record, "summary": summary}
