"""Vector quantisation: k-means codebooks in plain torch (CPU or GPU, wherever the data tensor lives), no faiss.

A codebook maps a D-vector to the index of its nearest code (encode) and back to that code (decode). Two uses:
    colour palette (ImageGPT): D = 3, one RGB pixel per token          image_to_tokens(cb, images, patch=1)
    patch codebook (Parti, TTS): D = P*P*C, one P x P patch per token   image_to_tokens(cb, images, patch=P)
                                                                        spec_to_tokens(cb, mel, patch=P)
Patch vectors are laid out (p1, p2, c): 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'.
Codes live in the units of the data they were fit on (pixels 0..255, normalised log-mel, ...).

fit_kmeans: k-means++ seeding on a subsample, then Lloyd iterations (full batch) or Sculley's mini-batch updates,
re-seeding dead codes (no assignment) at the points farthest from their code. Reports distortion (mean squared
distance per vector), mse (per element), usage (fraction of codes used) and perplexity (exp of code-usage entropy).
A Codebook has no parameters: the ImageGPT palette Codebook(512, 3) is a 512 x 3 buffer (1,536 numbers).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _chunk_rows(k: int, chunk_size: int | None) -> int:
    """Rows per distance block: about 8 MB of float32 distances (2M), which stays in cache between the matrix
    product that writes it and the row-min that reads it (a 50000 x 256 block in one piece was ~1.5x slower)."""
    return chunk_size or max(256, (1 << 21) // k)


def _row_min(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) -> (row minima (n,), their column (n,) long). On CPU the argmin runs in NumPy (through the tensor's
    buffer, no copy): torch's min(dim=1) with indices took 6x as long here (2.7 vs 0.45 ms for 8192 x 256), more
    than the matrix product that made the block; the minima are then gathered. Elsewhere torch's min."""
    if d.device.type != "cpu":
        return d.min(dim=1)
    i = torch.from_numpy(d.numpy().argmin(axis=1))  # (n,) first minimum, as torch's min
    return d.gather(1, i[:, None]).squeeze(1), i


def _nearest(xc: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, chunk_size: int | None):
    """Nearest code of every row of xc (n, D) float32 among c (K, D) with c_sq = |c|^2 (K,), both already centred
    on the same point -> (idx (n,) long, |c|^2 - 2 x.c at that code (n,)): add |x|^2 for the squared distance."""
    best, idx = [], []
    for xs in xc.split(_chunk_rows(len(c), chunk_size)):
        d = torch.addmm(c_sq, xs, c.T, alpha=-2)  # (n, K): |c|^2 - 2 x.c, the part of the distance that varies
        b, i = _row_min(d)
        best.append(b)
        idx.append(i)
    return (idx[0], best[0]) if len(idx) == 1 else (torch.cat(idx), torch.cat(best))


@torch.no_grad()
def assign(x: torch.Tensor, codes: torch.Tensor, chunk_size: int | None = None):
    """Nearest code of every row. x: (N, D), codes: (K, D) -> (idx (N,) long, squared distance (N,) float32).

    Distances as |x|^2 - 2 x.c + |c|^2, both sides centred on the codes' mean first (keeps float32 and TF32
    accurate for data far from the origin, e.g. pixels in 0..255), N processed in chunks to bound memory.
    """
    codes = codes.float()
    mu = codes.mean(dim=0)
    c = codes - mu  # (K, D)
    xc = x.float() - mu  # (N, D)
    idx, best = _nearest(xc, c, (c * c).sum(dim=1), chunk_size)
    return idx, (best + (xc * xc).sum(dim=1)).clamp_min(0)  # (N,) add |x|^2 back


def code_stats(idx: torch.Tensor, d2: torch.Tensor, k: int, dim: int) -> dict[str, float]:
    """Quality of an assignment: distortion, mse, usage and perplexity (see the module docstring)."""
    counts = torch.bincount(idx, minlength=k).float()  # (K,)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    distortion = d2.mean().item()
    return {"distortion": distortion, "mse": distortion / dim, "usage": (counts > 0).float().mean().item(),
            "perplexity": math.exp(entropy.item())}


class Codebook(nn.Module):
    """K codes of dimension D in the buffer `codes` (K, D). encode (..., D) -> (...) long; decode (...) -> (..., D)."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros(k, dim))

    @classmethod
    def from_codes(cls, codes: torch.Tensor) -> Codebook:
        cb = cls(*codes.shape)
        cb.codes.copy_(codes)
        return cb

    @torch.no_grad()
    def encode(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """(..., D) any dtype -> (...) long, the index of the nearest code."""
        idx, _ = assign(x.reshape(-1, x.shape[-1]).to(self.codes.device), self.codes, chunk_size)  # (N,) of (N, D)
        return idx.reshape(x.shape[:-1])  # (...)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) long -> (..., D) float32 codes."""
        return self.codes[idx]

    def forward(self, x: torch.Tensor):
        """(..., D) -> (quantised (..., D), idx (...))."""
        idx = self.encode(x)
        return self.decode(idx), idx

    @torch.no_grad()
    def stats(self, x: torch.Tensor) -> dict[str, float]:
        """Distortion, mse, usage and perplexity of this codebook on x (N, D)."""
        idx, d2 = assign(x.reshape(-1, x.shape[-1]).to(self.codes.device), self.codes)  # over (N, D)
        return code_stats(idx, d2, *self.codes.shape)


@torch.no_grad()
def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability proportional to the
    squared distance to the nearest centre so far. x: (N, D) float -> (k, D), rows of x.

    The distance to each new centre is one matrix-vector product, |x|^2 - 2 x.c + |c|^2, in float64 on x centred on
    its mean (rounding then stays far below the spacing of distinct points, so duplicates of a chosen point keep a
    draw weight near zero, as with the exact difference).
    """
    N = x.shape[0]
    xc = x.double() - x.double().mean(dim=0)  # (N, D)
    x_sq = (xc * xc).sum(dim=1)  # (N,)
    u = torch.rand(k, dtype=torch.float64, device=x.device, generator=generator)  # (k,) one uniform draw per centre
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = (u[0] * N).long().clamp_max(N - 1)
    d2 = torch.full_like(x_sq, math.inf)  # (N,) squared distance to the nearest chosen centre
    for j in range(k):
        if j:  # inverse-CDF draw, P(i) proportional to d2[i]; the epsilon allows k > distinct points
            cdf = (d2 + 1e-30).cumsum(dim=0)  # (N,)
            chosen[j] = torch.searchsorted(cdf, u[j:j + 1] * cdf[-1], right=True).clamp_max(N - 1)[0]
        c = xc[chosen[j]]  # (D,)
        d2 = torch.minimum(d2, torch.addmv(x_sq, xc, c, alpha=-2).add_(c @ c).clamp_min_(0))
    return x[chosen].clone()


@torch.no_grad()
def _reseed(codes, dead, xb, d2b) -> int:
    """Move the dead codes onto the points of xb (n, D) farthest from their current code (d2b (n,)); returns count."""
    dead_idx = dead.nonzero().squeeze(1)
    n = min(len(dead_idx), len(xb))
    if n:
        codes[dead_idx[:n]] = xb[d2b.topk(n).indices]
    return n


@torch.no_grad()
def fit_kmeans(x: torch.Tensor, k: int, iters: int = 20, batch_size: int | None = None, seed: int = 0,
               init: torch.Tensor | None = None, init_size: int | None = None, chunk_size: int | None = None):
    """Fit a k-code codebook to x (N, D) on x's device. Returns (Codebook, stats).

    batch_size=None (or >= N): `iters` Lloyd iterations over all of x. Otherwise `iters` mini-batch steps
    (Sculley 2010: each code moves to the running mean of the points assigned to it; here the counts are
    multiplied by 1 - 1/ceil(N / batch_size) each step, so a code forgets the points of about an epoch ago
    and one that changes cluster is not held back by its old one).
    Dead codes are re-seeded after every Lloyd iteration, and in mini-batch mode every ceil(N / batch_size)
    steps (about an epoch) for the codes no point of that window was assigned to.
    init: (k, D) starting codes (warm start) instead of k-means++ on init_size (default max(32k, 1024)) points.
    stats: distortion, mse, usage, perplexity over all of x with the final codes, and `reseeded` (codes moved).
    """
    x = x.reshape(-1, x.shape[-1]).float()  # (N, D)
    N, D = x.shape
    g = torch.Generator(device=x.device).manual_seed(seed)
    if init is None:
        sub = x[torch.randperm(N, device=x.device, generator=g)[: init_size or max(32 * k, 1024)]]
        codes = kmeans_pp(sub, k, g)  # (K, D)
    else:
        codes = init.to(x.device, torch.float32).clone()  # (K, D)
    # Work centred on the data's mean (float32 stays accurate far from the origin, see assign); |x|^2 once.
    mu = x.mean(dim=0)  # (D,)
    xc = x - mu  # (N, D)
    x_sq = (xc * xc).sum(dim=1)  # (N,)
    codes -= mu
    full = batch_size is None or batch_size >= N
    total = torch.zeros(k, device=x.device)  # mini-batch: decayed count of the points assigned to each code
    window = torch.zeros(k, device=x.device)  # points assigned since the last dead-code check
    every = 1 if full else math.ceil(N / batch_size)
    reseeded = 0
    for it in range(iters):
        if full:
            xb, xb_sq = xc, x_sq  # (N, D), (N,)
        else:
            pick = torch.randint(N, (batch_size,), device=x.device, generator=g)
            xb, xb_sq = xc[pick], x_sq[pick]  # (n, D), (n,)
        idx, best = _nearest(xb, codes, (codes * codes).sum(dim=1), chunk_size)
        counts = torch.bincount(idx, minlength=k).float()  # (K,)
        sums = torch.zeros_like(codes).scatter_add_(0, idx[:, None].expand(-1, D), xb)  # (K, D) per-code sums
        hit = counts > 0
        if full:
            codes[hit] = sums[hit] / counts[hit, None]
        else:
            total.mul_(1 - 1 / every).add_(counts)
            codes[hit] += (sums[hit] - counts[hit, None] * codes[hit]) / total[hit, None]
        window += counts
        if (it + 1) % every == 0:
            dead = window == 0
            reseeded += _reseed(codes, dead, xb, (best + xb_sq).clamp_min(0))
            total[dead] = 0
            window.zero_()
    idx, best = _nearest(xc, codes, (codes * codes).sum(dim=1), chunk_size)
    stats = code_stats(idx, (best + x_sq).clamp_min(0), k, D)
    return Codebook.from_codes(codes + mu), {**stats, "reseeded": reseeded}


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'; p=1 gives RGB pixels in raster order."""
    B, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"images of {H}x{W} do not split into {p}x{p} patches; pick a patch size dividing {H} and {W}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p1, w, p2)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, h*w, p1*p2*C)


def unpatchify(patches: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of patchify."""
    B, N, PPC = patches.shape
    h, w, C = height // p, width // p, PPC // (p * p)
    x = patches.reshape(B, h, w, p, p, C)  # (B, h, w, p1, p2, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, height, width)  # (B, C, h*p1, w*p2)


def patchify_spec(mel: torch.Tensor, p: int) -> torch.Tensor:
    """(B, n_mels, n_frames) -> (B, N, P*P), 'b (f p1) (t p2) -> b (t f) (p1 p2)'.

    Tokens run time-major (all frequency patches of one time step, then the next), so an autoregressive decoder
    speaks left to right; each patch vector is laid out (p1, p2), as patchify lays out a (1, n_mels, n_frames) image.
    """
    B, F, T = mel.shape
    if F % p or T % p:
        raise ValueError(f"spectrogram of {F}x{T} does not split into {p}x{p} patches")
    x = mel.reshape(B, F // p, p, T // p, p)  # (B, f, p1, t, p2)
    return x.permute(0, 3, 1, 2, 4).reshape(B, (T // p) * (F // p), p * p)  # (B, t*f, p1*p2)


def unpatchify_spec(patches: torch.Tensor, p: int, n_mels: int, n_frames: int) -> torch.Tensor:
    """(B, N, P*P) -> (B, n_mels, n_frames), the inverse of patchify_spec."""
    B = patches.shape[0]
    x = patches.reshape(B, n_frames // p, n_mels // p, p, p)  # (B, t, f, p1, p2)
    return x.permute(0, 2, 3, 1, 4).reshape(B, n_mels, n_frames)  # (B, f*p1, t*p2)


def image_to_tokens(codebook: Codebook, images: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """(B, C, H, W) in the codebook's units -> (B, H/P * W/P) long codes in raster order."""
    return codebook.encode(patchify(images, patch))


def tokens_to_image(codebook: Codebook, tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """(B, N) long -> (B, C, H, W) float32 image made of the codes."""
    return unpatchify(codebook.decode(tokens), patch, height, width)


def spec_to_tokens(codebook: Codebook, mel: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, n_mels, n_frames) -> (B, N) long codes, time-major (patchify_spec)."""
    return codebook.encode(patchify_spec(mel, patch))


def tokens_to_spec(codebook: Codebook, tokens: torch.Tensor, patch: int, n_mels: int, n_frames: int):
    """(B, N) long -> (B, n_mels, n_frames) float32 spectrogram (for Griffin-Lim in tasks/)."""
    return unpatchify_spec(codebook.decode(tokens), patch, n_mels, n_frames)
