"""The codebook stage: fit the VQ codebooks the generative models read and write tokens through.

    pixels  colour palette, one RGB pixel per token (ImageGPT)              fit on prep/patches/pixels.npy
    image   image patch codebook, one P x P x 3 patch per token (Parti)     fit on prep/patches/image.npy
    mel     spectrogram patch codebook, one P x P patch per token (TTS)     fit on prep/patches/mel.npy
Each codebook is saved as {"config": {...}, "state_dict": ...} (loadable with torch.load(weights_only=True)),
with its quality (distortion, usage, perplexity) and a usage histogram. A codebook that uses fewer than
`min_usage` of its codes fails the stage: collapsed tokens would quietly starve the generative models.

Where the image codebook's codes go (built-in set, k=256): 74% of the train patches are one flat colour and 9 codes
(3 backgrounds, 6 shape colours) take them at mse 0.1; the other 247 codes share the edge patches (mse 450 per
element): every edge shape has to be learnt once per foreground x background pair (18), which is what more codes buy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure
import numpy as np
import torch

from models.vq import Codebook, fit_kmeans
from tasks.infra.common import atomic_dir, write_json

KINDS = ("pixels", "image", "mel")


class CodebookCollapseError(ValueError):
    """A codebook uses too few of its codes."""


@dataclass(frozen=True)
class CodebookConfig:
    pixels_k: int = 64  # ImageGPT palette size (the built-in set has few colours; ImageGPT used 512 on photos)
    # image_k, measured on the built-in set (test split, 368 images; the trained ViT names 0.88 of them as they are):
    # the ViT on test images passed through the 4x4-patch codebook, k = 256 / 512 / 1,024 / 2,048: 0.67 / 0.73 /
    # 0.78 / 0.79 (fit on the prep sample of 50,960 patches; on all 93,184 train patches 1,024: 0.80, 2,048: 0.83).
    # 50 iterations instead of 25, or k-means on the 25,714 distinct patches only, change it by <= 0.01. 2x2 patches
    # (256 tokens an image) k = 256 / 512 / 1,024: 0.84 / 0.86 / 0.85. Yet t2i learns less from more codes at its
    # default 1,200 steps (round trip, guidance 3, 64 a prompt), k = 256 / 512 / 1,024: colour 0.69 / 0.63 / 0.53,
    # shape 0.25 / 0.25 / 0.25 (best of 4 by CLIP: colour 0.83 / 0.79 / 0.73, shape 0.42 / 0.44 / 0.42): shape is not
    # held back by the codebook at this budget, and colour drops with more codes. So 256 stays.
    image_k: int = 256
    mel_k: int = 256
    iters: int = 25
    batch_size: int | None = None  # None: full-batch Lloyd iterations; an int: mini-batch k-means
    min_usage: float = 0.25
    seed: int = 0
    kinds: tuple[str, ...] = KINDS  # which to fit (the pipeline: those its models read)

    def __post_init__(self):
        for kind in KINDS:
            if getattr(self, f"{kind}_k") < 2:
                raise ValueError(f"{kind}_k={getattr(self, f'{kind}_k')} must be >= 2")
        if not 0 <= self.min_usage <= 1:
            raise ValueError(f"min_usage={self.min_usage} must be within [0, 1]")
        if set(self.kinds) - set(KINDS):
            raise ValueError(f"kinds={self.kinds}: choose among {KINDS}")
        object.__setattr__(self, "kinds", tuple(self.kinds))  # a list from JSON/YAML: hashable again


def save_codebook(codebook: Codebook, path: Path, meta: dict) -> None:
    torch.save({"config": {"k": codebook.codes.shape[0], "dim": codebook.codes.shape[1], **meta},
                "state_dict": codebook.state_dict()}, path)


def load_codebook(path: str | Path) -> Codebook:
    """Rebuild a saved codebook; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook {path} does not exist; run the codebook stage (tessera run) first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cb = Codebook(ckpt["config"]["k"], ckpt["config"]["dim"])
    cb.load_state_dict(ckpt["state_dict"])
    return cb


def _usage_plot(counts: np.ndarray, title: str, path: Path) -> None:
    fig = Figure(figsize=(6, 2.6))
    ax = fig.subplots()
    order = np.sort(counts)[::-1]
    ax.bar(np.arange(len(order)), order, width=1.0, color="#4c72b0")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("vectors")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fit_codebooks(prep_dir: Path, cfg: CodebookConfig, out_dir: Path) -> dict:
    """Fit every codebook whose patch sample exists in `prep_dir/patches`; write them atomically to `out_dir`."""
    patches = Path(prep_dir) / "patches"
    record: dict = {"codebooks": {}, "metrics": {}}
    with atomic_dir(out_dir, record) as tmp:
        for kind in cfg.kinds:
            src = patches / f"{kind}.npy"
            if not src.is_file() or np.load(src, mmap_mode="r").size == 0:
                continue
            x = torch.from_numpy(np.load(src).astype(np.float32))  # (N, D)
            k = getattr(cfg, f"{kind}_k")
            if len(x) < k:
                raise ValueError(f"{kind}: only {len(x)} sample vectors for k={k} codes; lower codebooks.{kind}_k (a --config field) or add data")
            codebook, stats = fit_kmeans(x, k, iters=cfg.iters, batch_size=cfg.batch_size, seed=cfg.seed)
            counts = torch.bincount(codebook.encode(x), minlength=k).numpy()
            title = f"{kind}: k={k}, usage {stats['usage']:.0%}, perplexity {stats['perplexity']:.1f}"
            if stats["usage"] < cfg.min_usage:
                raise CodebookCollapseError(
                    f"{kind} codebook uses {stats['usage']:.0%} of its {k} codes (< min_usage {cfg.min_usage:.0%}); "
                    f"lower {kind}_k or add more varied data"
                )
            save_codebook(codebook, tmp / f"{kind}.pt", {"kind": kind, "source": src.name})
            _usage_plot(counts, title, tmp / f"{kind}_usage.png")
            record["codebooks"][kind] = f"{kind}.pt"
            record["metrics"][kind] = {**stats, "k": k, "n": len(x), "dim": x.shape[1]}
        write_json(tmp / "metrics.json", record["metrics"])
        record["config"] = asdict(cfg)
    return record
