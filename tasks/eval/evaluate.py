"""Evaluate trained checkpoints on a prepared split: paths in, {"metrics", "artifacts", "summary"} out.

    evaluate(model, checkpoint, prep_dir, out_dir, codebooks, split, max_samples)
        vit, ast        accuracy, top-5, per-class table (CSV + markdown), confusion matrix PNG, held-out combos
        imagegpt        held-out bits/token (teacher forced) + grids of unconditional samples and of completions
        t2i             held-out bits/token + images generated from test captions (decoded through the codebook)
        tts             mel L1 (teacher-forced and free) + speech from test transcripts (Griffin-Lim) as WAVs
        asr             CER and WER of greedy transcripts + an examples table
        clip            zero-shot accuracy (shape, colour, colour+shape; prompt ensembles) + recall@1/5/10 both ways
Which evaluation a model gets is its table entry's `evaluation` (tasks/train/table.py), the key of EVALUATIONS.
What the data's captions name (shapes, colours, held-out pairs) comes in as a `Vocabulary`
(tasks/data/builtin/vocab.py); without one, the evaluations that need it (zero-shot label sets, held-out subsets)
are left out. Round trips across modalities (scored by the other trained models) are in tasks/eval/roundtrip.py.

Artifacts go into out_dir atomically (tasks/infra/common.py atomic_dir) with metrics.json and summary.md; the caller (the
pipeline's task wrapper) logs them. Everything runs under torch.no_grad, in fp32 by default: CPU bf16 autocast
measured 2-7x slower here for these model sizes (casts dominate the small matmuls); PRECISION = "bf16" turns it on
for the forward passes and generation (never for the teacher-forced NLL, where bf16 logits would move bits/token in
the second decimal, nor Griffin-Lim). Images are sampled (tasks/eval/generate.py IMAGEGPT_SAMPLING,
T2I_SAMPLING: temperature, top-k, classifier-free guidance) from a seeded generator:
greedy image decoding collapses to blank backgrounds, a background patch being the likeliest code almost everywhere.
Speech and transcripts are greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tasks.data import loader
from tasks.data.shards import shard_urls
from tasks.data.builtin.vocab import Vocabulary
from tasks.eval import audio_out, generate
from tasks.eval.metrics import cer, classification_metrics, hit_rates, retrieval_recall, wer, zero_shot_prompts, zero_shot_weights
from tasks.eval.report import N_SHOW, confusion_plot, finish, image_grid, table, write_csv
from tasks.infra.common import atomic_dir
from tasks.train.batches import TOKENIZER, BatchContext, DataInfo, mels
from tasks.train.table import build_from_checkpoint, spec

BATCH_SIZE = 64
N_EXAMPLES = 10  # rows of the ASR examples table
SEED = 0


PRECISION = "fp32"  # or "bf16": CPU autocast for forward passes and generation


def amp():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")


# ---------------------------------------------------------------------------------------------------- evaluation
def load_model(checkpoint: Path, prep_dir: Path, codebooks: dict[str, str] | None = None, expect: str | None = None,
               role: str | None = None):
    """A trainer checkpoint -> (name, model in eval mode, BatchContext on prep_dir's stats and the model's codebook).

    expect: the model name it must hold; role: the round-trip role its model must play (table `role`).
    codebooks default to the paths the checkpoint recorded at training time."""
    model, ckpt = build_from_checkpoint(checkpoint)
    name = ckpt["model"]
    if expect is not None and name != expect:
        raise ValueError(f"{checkpoint} holds a {name} model, not a {expect}")
    if role is not None and spec(name).role != role:
        raise ValueError(f"{checkpoint} holds a {name} model, which is no {role} (model table `role`)")
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
    vocab: Vocabulary | None = None

    def samples(self, limit: int | None = None) -> Iterator[list[dict]]:
        """Decoded samples of the split in file order, in batches, at most min(limit, max_samples) in all."""
        caps = [c for c in (limit, self.max_samples) if c is not None]
        left = min(caps) if caps else math.inf
        if left < 1:
            raise ValueError(f"max_samples={self.max_samples} leaves nothing to evaluate; use None or >= 1")
        urls = shard_urls(self.ctx.data.prep_dir, spec(self.name).modality, self.split)
        for batch in loader.batches(urls, BATCH_SIZE, train=False, split_nodes=False):
            yield batch[: int(min(left, len(batch)))]
            left -= len(batch)
            if left <= 0:
                return

    def first(self, n: int | None = None) -> list[dict]:
        return [s for b in self.samples(n) for s in b]

    def batch(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return spec(self.name).make_batch(samples, self.ctx)

    def heldout(self, sample: dict) -> bool:
        return self.vocab is not None and self.vocab.is_heldout(sample["info"].get("meta") or {})


def eval_classifier(run: Run) -> tuple[dict, list[str]]:
    logits, labels, heldout = [], [], []
    for samples in run.samples():
        batch = run.batch(samples)
        with amp():
            logits.append(run.model(batch)[0].float())
        labels.append(batch["label"])
        heldout += [run.heldout(s) for s in samples]
    logits, labels, heldout = torch.cat(logits), torch.cat(labels), torch.tensor(heldout, dtype=torch.bool)
    classes = run.ctx.data.modality(spec(run.name).modality)["classes"]
    metrics, rows, cm = classification_metrics(logits, labels, classes)
    metrics["n"] = float(len(labels))
    if heldout.any():
        metrics["heldout_accuracy"] = (logits[heldout].argmax(-1) == labels[heldout]).float().mean().item()
        metrics["n_heldout"] = float(heldout.sum())
    write_csv(run.out / "per_class.csv", ("class", "n", "accuracy"), rows)
    (run.out / "per_class.md").write_text(table(("class", "n", "accuracy"), rows) + "\n")
    title = f"{run.name} on {run.split}: accuracy {metrics['accuracy']:.3f}"
    confusion_plot(cm, classes, run.out / "confusion.png", title)
    return metrics, ["### Per class", table(("class", "n", "accuracy"), rows)]


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
    """Bits/token, a grid of unconditional samples and one of completions of test images from their top half (the
    round trip scores both with the trained ViT: tasks/eval/roundtrip.py roundtrip_imagegpt)."""
    cfg, how, g = run.model.cfg, generate.IMAGEGPT_SAMPLING, torch.Generator().manual_seed(SEED)
    label = torch.arange(N_SHOW) % cfg.n_classes if cfg.n_classes else None
    with amp():
        tokens = run.model.generate(N_SHOW, how.temperature, how.top_k, label=label, generator=g)  # (N, side^2)
    images = generate.imagegpt_pixels(run.model, run.ctx, tokens)  # (N, 3, side, side) palette colours, 0..255
    image_grid(images, [f"sample {i}" for i in range(N_SHOW)], run.out / "samples.png")
    real = torch.from_numpy(np.stack([s["img"] for s in run.first(N_SHOW)])).float()  # (M, 3, S, S)
    with amp():
        done = generate.complete_images(run.model, run.ctx, real, math.isqrt(cfg.seq_len) // 2, generator=g)
    image_grid(done, ["completed from the top half"] * len(done), run.out / "completions.png")
    return nll_bits(run), ["Samples: ![](samples.png)", "Completions: ![](completions.png)"]


def eval_t2i(run: Run) -> tuple[dict, list[str]]:
    samples = run.first(N_SHOW)
    captions = [s["info"].get("text") or "" for s in samples]
    with amp():
        generated = generate.generate_images(run.model, run.ctx, captions,
                                             generator=torch.Generator().manual_seed(SEED))
    reference = torch.from_numpy(np.stack([s["img"] for s in samples])).float()  # (N, 3, S, S) 0..255
    image_grid(torch.cat([generated, reference]), captions + ["(reference)"] * len(samples), run.out / "samples.png",
               ncols=len(samples))
    return nll_bits(run), ["Samples (top) and the test images of their captions: ![](samples.png)"]


def mel_error(run: Run) -> dict[str, float]:
    """Text-to-speech over the split: L1 to the real normalised log-mel, teacher-forced (each clip's own length:
    `mel_l1`) and free-running (predicted length: `free_mel_l1`), and the length error; both in the voice of another
    clip of the speaker, as in training (batches.voice_partners)."""
    l1, free, frames, n = 0.0, 0.0, 0.0, 0
    for samples in run.samples():
        batch = run.batch(samples)
        target = batch["mel"].float()  # (B, n_mels, n_frames)
        mel, _ = run.model(batch)
        spoken = run.model.generate(batch["src"], batch["ref"])
        l1 += (mel.float() - target).abs().mean((1, 2)).sum().item()
        free += (spoken.float() - target).abs().mean((1, 2)).sum().item()
        frames += (run.model.speech_length(spoken) - run.model.speech_length(target)).abs().sum().item()
        n += len(samples)
    return {"mel_l1": l1 / max(n, 1), "free_mel_l1": free / max(n, 1), "length_error_frames": frames / max(n, 1),
            "n": float(n)}


def eval_tts(run: Run) -> tuple[dict, list[str]]:
    samples = run.first(N_SHOW)
    texts = [s["info"].get("text") or "" for s in samples]
    with amp():  # reference: the first window of each clip, as the model was trained on
        generated = audio_out.generate_speech(run.model, run.ctx, texts)
        reference = mels(samples, run.ctx.data.mel_grid[1])
    sr = audio_out.mel_config(run.ctx.data.stats).sample_rate
    for prefix, mel in (("generated", generated), ("reference", reference)):  # reference: the vocoder's ceiling
        audio_out.write_wavs(audio_out.vocode(run.ctx.data.stats, mel), sr, run.out / "wav", prefix)
    audio_out.spectrogram_plot(generated, reference, texts, run.out / "spectrograms.png")
    rows = [(f"generated_{i:02d}.wav", t) for i, t in enumerate(texts)]
    return mel_error(run), ["### Generated speech (in the train split's first voices, in turn)",
                            table(("file", "transcript"), rows)]


def transcribe(model, mel: torch.Tensor) -> list[str]:
    """asr: normalised log-mel (N, n_mels, n_frames) -> greedy transcripts."""
    with amp():
        return TOKENIZER.batch_decode(model.generate(mel, temperature=0.0))


def eval_asr(run: Run) -> tuple[dict, list[str]]:
    refs, hyps = [], []
    for samples in run.samples():
        refs += [s["info"].get("text") or "" for s in samples]
        hyps += transcribe(run.model, mels(samples, run.ctx.data.mel_grid[1]))  # the first window
    rows = list(zip(refs, hyps))[:N_EXAMPLES]
    (run.out / "examples.md").write_text(table(("reference", "hypothesis"), rows) + "\n")
    metrics = {"cer": cer(refs, hyps), "wer": wer(refs, hyps), "n": float(len(refs))}
    return metrics, ["### Examples", table(("reference", "hypothesis"), rows)]


def encode_texts(clip) -> Callable[[list[str]], torch.Tensor]:
    """CLIP's text tower as list of N strings -> (N, E), each distinct string encoded once (label sets share them)."""
    cache: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(new), 4 * BATCH_SIZE):
            chunk = new[i : i + 4 * BATCH_SIZE]
            with amp():
                cache.update(zip(chunk, clip.encode_text(TOKENIZER.batch_encode(chunk, clip.cfg.context_len)).float()))
        return torch.stack([cache[t] for t in texts])
    return encode


def zero_shot_classifiers(clip, label_sets: dict) -> dict[str, tuple[list[str], torch.Tensor]]:
    """{label set: (class names, phrases per class)} -> {label set: (class names, weights (E, C))}."""
    encode = encode_texts(clip)
    return {name: (classes, zero_shot_weights(encode, p)) for name, (classes, p) in zero_shot_prompts(label_sets).items()}


def clip_label_sets(run: Run) -> tuple[dict, Callable[[dict], dict]]:
    """Zero-shot label sets and each sample's truth: the vocabulary's (the built-in set: shape, colour, combo), else
    the data's own class names when it has two or more ("label": "a photo of a {label}." ...), else none."""
    if run.vocab:
        return run.vocab.label_sets(), lambda s: run.vocab.truth(s["info"].get("meta") or {})
    classes = run.ctx.data.modality("image").get("classes") or []
    if len(classes) < 2:
        return {}, lambda s: {}
    return ({"label": (classes, [[c.replace("_", " ")] for c in classes])},
            lambda s: {"label": s["info"].get("label")})


def zero_shot(clip, images: torch.Tensor, classifiers: dict) -> tuple[dict[str, list[str]], torch.Tensor]:
    """Normalised images (N, 3, H, W) -> ({label set: predicted class name per image}, image embeddings (N, E))."""
    with amp():
        z = clip.encode_image(images, normalize=True).float()  # (N, E), unit norm
    return {name: [classes[i] for i in (z @ w).argmax(-1).tolist()] for name, (classes, w) in classifiers.items()}, z


def eval_clip(run: Run) -> tuple[dict, list[str]]:
    img, txt, truths, heldout, preds = [], [], [], [], {}
    label_sets, truth = clip_label_sets(run)
    classifiers = zero_shot_classifiers(run.model, label_sets) if label_sets else {}
    for samples in run.samples():
        batch = run.batch(samples)
        pred, z = zero_shot(run.model, batch["image"], classifiers)
        for k, v in pred.items():
            preds.setdefault(k, []).extend(v)
        img.append(z)
        with amp():
            txt.append(run.model.encode_text(batch["text"], normalize=True).float())
        truths += [truth(s) for s in samples]
        heldout += [run.heldout(s) for s in samples]
    metrics, sections = {"n": float(len(truths))}, []
    if classifiers:
        rows = hit_rates(preds, {k: [t.get(k) for t in truths] for k in classifiers}, heldout)
        metrics.update({f"zero_shot/{k}_{'' if sub == 'all' else 'heldout_'}accuracy": acc for k, sub, _, acc in rows})
        sections = ["### Zero-shot", table(("label set", "subset", "n", "accuracy"), rows)]
    sim = torch.cat(img) @ torch.cat(txt).T  # (N, N) image i against caption j
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        for k, r in retrieval_recall(s).items():
            metrics[f"retrieval/{direction}_recall_at_{k}"] = r
    return metrics, sections


# keyed by the model table's `evaluation` names (tasks/train/table.py)
EVALUATIONS: dict[str, Callable[[Run], tuple[dict, list[str]]]] = {
    "classifier": eval_classifier, "image-sampler": eval_imagegpt, "text-to-image": eval_t2i,
    "text-to-speech": eval_tts, "transcriber": eval_asr, "image-text": eval_clip,
}


@torch.no_grad()
def evaluate(model: str, checkpoint: Path, prep_dir: Path, out_dir: Path, codebooks: dict[str, str] | None = None,
             split: str = "test", max_samples: int | None = None, vocab: Vocabulary | None = None) -> dict:
    """Evaluate a trainer checkpoint of `model` on `split` of prep_dir; artifacts into out_dir (atomically).

    vocab: what the data's captions name (the built-in set's: tasks/data/builtin/vocab.py BUILTIN), for zero-shot
    label sets and held-out subsets. Returns {"metrics": {name: float}, "artifacts": [paths relative to out_dir],
    "summary": markdown}."""
    evaluation = spec(model).evaluation
    if evaluation not in EVALUATIONS:
        raise ValueError(f"no evaluation {evaluation!r} for model {model!r}; the model table names one of "
                         f"{', '.join(EVALUATIONS)}")
    name, net, ctx = load_model(Path(checkpoint), Path(prep_dir), codebooks, expect=model)
    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        metrics, sections = EVALUATIONS[evaluation](Run(name, net, ctx, split, max_samples, tmp, vocab))
        summary = finish(tmp, record, f"{model} on {split}", metrics, sections)
    return {**record, "summary": summary}
