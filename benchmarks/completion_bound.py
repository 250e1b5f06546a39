"""python -m benchmarks --completion-bound ROOT: how much of a test image's shape its top half tells, on the built-in
set, at ImageGPT's size and palette: what ImageGPT's completions (issue 13: the ViT names their shape on >= 0.7 of the
test images; tasks/eval/roundtrip.py `roundtrip_imagegpt`) could score with a perfect model of the top half.

A small CNN, three seeds, is trained on the train split's top halves (ROOT's latest `make run`: its prep and its
ImageGPT's 16 px palette; the bottom rows are left out, not filled) with each image's colour channels put in a random
order and half of them mirrored (the shapes are left-right symmetric; half the test images are colour/shape pairs no
training image shows, so colour must not decide the shape), keeps its best epoch by val loss, and reads the test top
halves and their mirror images. Its ensemble's posterior over the six shapes gives two figures:

- `mean_p_true`, its mean probability of the true shape: what a completer that draws its shape from this posterior
  scores (ImageGPT's completions are drawn);
- `argmax`, the share whose likeliest shape is the true one: what a completer that always draws the likeliest shape
  scores.

Both before the judge's own misses on drawn images (the ViT on the real test images at 16 px: 0.95-0.98). Each for
every test image, the seen and held-out pairs, and the `visible` ones (roundtrip.VISIBLE: the top half holds at least
half of the thing) and the rest. Writes OUT/completion_bound.md and .json; ~5 minutes on two CPU cores.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SEEDS = 3
EPOCHS = 30
BATCH = 128
LR = 2e-3
WIDTH = 64


@dataclass
class Halves:
    """One split's top halves: x (N, 3, rows, side) in -1..1, y (N,) shape indices, heldout and visible (N,) bools."""

    x: torch.Tensor
    y: torch.Tensor
    heldout: torch.Tensor
    visible: torch.Tensor


class TopHalfNet(nn.Module):
    """Five 3x3 convolutions (width, width, 2 width stride 2, 2 width, 4 width stride 2) and a linear head."""

    def __init__(self, n_classes: int, rows: int, side: int, width: int = WIDTH):
        super().__init__()
        chans = [(3, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
                 (2 * width, 4 * width, 2)]
        layers: list[nn.Module] = []
        for c_in, c_out, stride in chans:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        out = self.features(torch.zeros(1, 3, rows, side)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(out, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def shuffled_and_mirrored(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) -> each image's channels in a random order, half of the images mirrored left-right."""
    order = torch.argsort(torch.rand(x.shape[0], 3, generator=g), dim=1)  # (B, 3)
    x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def fit(train: Halves, val: Halves, n_classes: int, seed: int, epochs: int = EPOCHS, width: int = WIDTH
        ) -> TopHalfNet:
    """A TopHalfNet trained on `train` (AdamW, one-cycle schedule), at its epoch of least val loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = TopHalfNet(n_classes, train.x.shape[2], train.x.shape[3], width)
    opt = torch.optim.AdamW(net.parameters(), LR, weight_decay=0.05)
    per_epoch = math.ceil(len(train.y) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=epochs * per_epoch)
    best, best_state = math.inf, None
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(train.y), generator=g)
        for i in range(0, len(order), BATCH):
            b = order[i : i + BATCH]
            loss = F.cross_entropy(net(shuffled_and_mirrored(train.x[b], g)), train.y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(net(val.x), val.y).item()
        if val_loss < best:
            best, best_state = val_loss, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval()


@torch.no_grad()
def posterior(nets: list[TopHalfNet], x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, n_classes): the nets' softmax averaged, each over the images and their mirror images."""
    return torch.stack([(n(x).softmax(-1) + n(x.flip(-1)).softmax(-1)) / 2 for n in nets]).mean(0)


def bound_metrics(p: torch.Tensor, test: Halves) -> dict[str, dict[str, float]]:
    """A posterior (N, C) over the test halves -> {group: {argmax, mean_p_true, n}} for every test image, the seen and
    held-out pairs, the visible ones and the rest."""
    p_true = p[torch.arange(len(test.y)), test.y]
    hit = (p.argmax(1) == test.y).float()
    groups = {"all": torch.ones_like(test.heldout), "seen": ~test.heldout, "heldout": test.heldout,
              "visible": test.visible, "not_visible": ~test.visible}
    return {k: {"argmax": round(hit[m].mean().item(), 3), "mean_p_true": round(p_true[m].mean().item(), 3),
                "n": int(m.sum())} for k, m in groups.items() if m.any()}


def top_halves(root: Path) -> tuple[dict[str, Halves], list[str], dict]:
    """ROOT's latest run -> ({train, val, test: Halves} at its ImageGPT's size and palette, the shapes, what was
    read)."""
    from tasks.data.builtin import vocab
    from tasks.eval.evaluate import Run, load_model
    from tasks.eval.generate import imagegpt_pixels, imagegpt_tokens
    from tasks.eval.roundtrip import VISIBLE, shown_share
    from tasks.train.batches import pixels

    latest = root / "latest.json"
    record = json.loads(latest.read_text()) if latest.exists() else {}
    ckpt = record.get("checkpoints", {}).get("imagegpt")
    if ckpt is None:
        raise SystemExit(f"--completion-bound {root}: no trained ImageGPT in {latest}; run `make run` (or `tessera "
                         f"run --root {root}`) on the built-in set first")
    prep = Path(record["prep"])
    name, gpt, ctx = load_model(Path(ckpt), prep, role="image-sampler")
    side = math.isqrt(gpt.cfg.seq_len)
    rows, voc = side // 2, vocab.BUILTIN
    out = {}
    for split in ("train", "val", "test"):
        samples = Run(name, gpt, ctx, split, None, root, voc).first()  # reads the split, writes nothing
        small = imagegpt_pixels(gpt, ctx, imagegpt_tokens(gpt, ctx, pixels(samples)))  # (N, 3, side, side) 0..255
        metas = [s["info"].get("meta") or {} for s in samples]
        out[split] = Halves(small[:, :, :rows] / 127.5 - 1,
                            torch.tensor([voc.shapes.index(voc.truth(m)["shape"]) for m in metas]),
                            torch.tensor([voc.is_heldout(m) for m in metas]),
                            shown_share(small, rows) >= VISIBLE)
    return out, list(voc.shapes), {"prep": str(prep), "imagegpt": ckpt, "side": side, "rows": rows}


def markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# How much shape a test image's top half tells ({result['read']['rows']} of {result['read']['side']} "
             f"rows, ImageGPT's palette)", "",
             f"{result['seeds']} CNNs trained on the train split's top halves ({result['n_train']} images, "
             f"{result['epochs']} epochs, channels shuffled and mirrored), their posterior on the test split "
             f"(benchmarks/completion_bound.py; {result['seconds']:.0f} s; prep {result['read']['prep']}).", "",
             "| test images | n | drawn from the posterior (mean p of the true shape) | the likeliest shape (argmax) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['mean_p_true']:.3f} | {v['argmax']:.3f} |" for k, v in m.items()]
    lines += ["", "Per seed (all test images, mean p / argmax): " + ", ".join(
        f"{s['mean_p_true']:.3f} / {s['argmax']:.3f}" for s in result["per_seed"])]
    return "\n".join(lines) + "\n"


def run(root: Path, out: Path, seeds: int = SEEDS, epochs: int = EPOCHS) -> dict:
    t0 = time.time()
    halves, shapes, read = top_halves(root)
    nets, per_seed = [], []
    for seed in range(seeds):
        nets.append(fit(halves["train"], halves["val"], len(shapes), seed, epochs))
        per_seed.append(bound_metrics(posterior(nets[-1:], halves["test"].x), halves["test"])["all"])
        print(f"seed {seed}: {per_seed[-1]}", flush=True)
    result = {"metrics": bound_metrics(posterior(nets, halves["test"].x), halves["test"]), "per_seed": per_seed,
              "seeds": seeds, "epochs": epochs, "n_train": len(halves["train"].y), "read": read,
              "seconds": time.time() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "completion_bound.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "completion_bound.md").write_text(markdown(result))
    print(markdown(result))
    return result
