"""Evaluation metrics as pure functions: edit-distance error rates, classification, retrieval, CLIP zero-shot.

No I/O, no models and no dataset vocabulary: tasks/eval/evaluate.py feeds them model outputs and the label sets of
the data's `Vocabulary` (tasks/data/builtin/vocab.py for the built-in set); tests check them by hand.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


RECALL_KS = (1, 5, 10)
# CLIP's prompt ensemble ("a {}." ... averaged); articles are fixed afterwards ("a orange" -> "an orange").
TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.",
             "a rendering of a {}.", "a {} on a plain background.", "a small {}.", "a large {}.", "there is a {}.")


# ---------------------------------------------------------------------------------------------------- text metrics
def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions of one element each) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalize_text(s: str) -> str:
    """Lowercase, whitespace collapsed: what CER/WER compare (transcripts here are lowercase phrases)."""
    return " ".join(s.lower().split())


def error_rate(refs: list[str], hyps: list[str], words: bool = False) -> float:
    """Corpus CER (characters) or WER (words): total edit distance / total reference length."""
    split = (lambda s: normalize_text(s).split()) if words else normalize_text
    dist = sum(levenshtein(split(r), split(h)) for r, h in zip(refs, hyps, strict=True))
    return dist / max(1, sum(len(split(r)) for r in refs))


def cer(refs: list[str], hyps: list[str]) -> float:
    return error_rate(refs, hyps)


def wer(refs: list[str], hyps: list[str]) -> float:
    return error_rate(refs, hyps, words=True)


# ---------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) predicted and true class ids -> (n, n) counts, rows = true class, columns = predicted."""
    return torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]):
    """logits (N, C), labels (N,) -> (metrics {accuracy, top5_accuracy}, per-class rows (class, n, acc), confusion)."""
    cm = confusion_matrix(logits.argmax(-1), labels, len(classes))
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (N, k)
    n = cm.sum(dim=1)
    rows = [(c, int(n[i]), cm[i, i].item() / n[i].item() if n[i] else float("nan")) for i, c in enumerate(classes)]
    metrics = {"accuracy": cm.diagonal().sum().item() / max(1, len(labels)),
               "top5_accuracy": (top == labels[:, None]).any(-1).float().mean().item()}
    return metrics, rows, cm


def retrieval_recall(sim: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """sim (N, N), query i matching item i -> {k: fraction of queries whose match ranks in the top k}; ties count
    for the match (identical captions are not told apart)."""
    rank = (sim > sim.diagonal()[:, None]).sum(dim=1)  # (N,) items scored above the match
    return {k: (rank < k).float().mean().item() for k in ks}


def zero_shot_weights(encode_text: Callable[[list[str]], torch.Tensor], class_prompts: list[list[str]]):
    """CLIP's prompt ensemble: column c = normalise(mean of the normalised embeddings of class c's prompts), (E, C).

    encode_text: list of N strings -> (N, E) embeddings (any norm)."""
    cols = [F.normalize(F.normalize(encode_text(p).float(), dim=-1).mean(dim=0), dim=-1) for p in class_prompts]
    return torch.stack(cols, dim=1)


def prompt_ensemble(name: str) -> list[str]:
    """TEMPLATES filled with one class phrase: "a photo of an orange star." ..."""
    return [re.sub(r"\ba (?=[aeiou])", "an ", t.format(name)) for t in TEMPLATES]


def zero_shot_prompts(label_sets: dict[str, tuple[list[str], list[list[str]]]]):
    """{label set: (class names, phrases per class)} -> {label set: (class names, prompts per class)}: each phrase
    through the prompt ensemble ("a photo of a red circle." ...), a class's prompts averaged by zero_shot_weights."""
    return {name: (classes, [[p for phrase in phrases for p in prompt_ensemble(phrase)] for phrases in per_class])
            for name, (classes, per_class) in label_sets.items()}


def hit_rates(pred: dict[str, list], want: dict[str, list], heldout: list[bool]) -> list[tuple[str, str, int, float]]:
    """Rows (key, "all" | "heldout", n, fraction of pred[key] == want[key]) over the items whose want is known."""
    rows = []
    for key, w in want.items():
        for subset, keep in (("all", [True] * len(w)), ("heldout", heldout)):
            hits = [p == t for p, t, k in zip(pred[key], w, keep, strict=True) if k and t is not None]
            if hits:
                rows.append((key, subset, len(hits), sum(hits) / len(hits)))
    return rows
