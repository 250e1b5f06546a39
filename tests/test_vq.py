"""k-means codebooks: recovery of known centres, encode/decode, dead-code re-seeding, stats, patch layouts."""

from __future__ import annotations

import math

import pytest
import torch

from models.vq import (
    Codebook,
    assign,
    code_stats,
    fit_kmeans,
    image_to_tokens,
    kmeans_pp,
    patchify,
    patchify_spec,
    spec_to_tokens,
    tokens_to_image,
    tokens_to_spec,
    unpatchify,
    unpatchify_spec,
)
from tests.tiny_models import _one_thread  # noqa: F401 (fixture)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blobs(n_per: int = 200, k: int = 8, dim: int = 4, noise: float = 0.1, seed: int = 0):
    """Points around k well separated centres: (centres (k, D), x (k * n_per, D))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    x = centres.repeat_interleave(n_per, 0) + noise * torch.randn(k * n_per, dim, generator=g)
    return centres, x[torch.randperm(len(x), generator=g)]


def nearest_error(codes: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """For every true centre, the distance to the closest fitted code: (k,)."""
    return torch.cdist(centres, codes.cpu()).min(dim=1).values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [None, 256])
def test_kmeans_recovers_known_centres(device, batch_size):
    centres, x = blobs()
    cb, stats = fit_kmeans(x.to(device), k=8, iters=30 if batch_size is None else 60, batch_size=batch_size, seed=0)
    assert cb.codes.device.type == device
    assert nearest_error(cb.codes, centres).max() < 0.05
    assert stats["usage"] == 1.0
    assert stats["perplexity"] == pytest.approx(8.0, rel=1e-3)  # equal-sized clusters
    assert stats["mse"] == pytest.approx(0.1**2, rel=0.2)  # what is left is the noise: variance 0.01 per element
    assert stats["distortion"] == pytest.approx(4 * stats["mse"])


def test_kmeans_pp_spreads_seeds():
    centres, x = blobs(k=6)
    seeds = kmeans_pp(x, 6, torch.Generator().manual_seed(1))
    assert nearest_error(seeds, centres).max() < 1.0  # one seed in every blob (uniform draws would often miss one)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(32, 6, generator=g)
    cb = Codebook.from_codes(codes)
    idx = torch.arange(32)
    assert torch.equal(cb.encode(cb.decode(idx)), idx)  # every code is its own nearest code
    x = torch.randn(3, 50, 6, generator=g)
    tokens = cb.encode(x)
    assert tokens.shape == (3, 50) and tokens.dtype == torch.long
    brute = torch.cdist(x.reshape(-1, 6), codes).argmin(dim=1).reshape(3, 50)
    assert torch.equal(tokens, brute)
    assert torch.equal(cb.encode(x, chunk_size=7), tokens)  # chunking changes nothing
    q, i = cb(x)
    assert q.shape == x.shape and torch.equal(q, codes[tokens]) and torch.equal(i, tokens)


def test_encode_far_from_origin():
    """Pixel-scale data (0..255): the centred distance keeps float32 exact enough to pick the right code."""
    codes = torch.tensor([[200.0, 200.0, 200.0], [200.5, 200.0, 200.0]])
    x = torch.tensor([[200.2, 200.0, 200.0], [200.3, 200.0, 200.0]])
    assert Codebook.from_codes(codes).encode(x).tolist() == [0, 1]


@pytest.mark.parametrize("batch_size", [None, 100])
def test_dead_code_is_reseeded(batch_size):
    """Three blobs, three codes, one of them far from everything: without re-seeding it never moves (usage 2/3)."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    g = torch.Generator().manual_seed(0)
    x = centres.repeat_interleave(100, 0) + 0.1 * torch.randn(300, 2, generator=g)
    init = torch.tensor([[0.0, 0.0], [0.2, 0.0], [100.0, 100.0]])
    assert assign(x, init)[0].bincount(minlength=3)[2] == 0  # code 2 starts dead
    cb, stats = fit_kmeans(x, 3, iters=20 if batch_size is None else 60, batch_size=batch_size, init=init)
    assert stats["reseeded"] >= 1
    assert stats["usage"] == 1.0
    assert nearest_error(cb.codes, centres).max() < 0.1


def test_code_stats():
    s = code_stats(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 3.0, 3.0]), k=4, dim=2)
    assert s == {"distortion": 2.0, "mse": 1.0, "usage": 0.5, "perplexity": pytest.approx(2.0)}
    s = code_stats(torch.tensor([0, 0, 0, 1]), torch.zeros(4), k=2, dim=1)
    assert s["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_patchify_layout_and_round_trip():
    images = torch.arange(2 * 3 * 4 * 6).float().reshape(2, 3, 4, 6)  # (B, C, H, W)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)  # a 2x3 grid of 2x2x3 patches
    # patch (row 1, col 2) of image 1, laid out (p1, p2, c)
    expected = [images[1, c, 2 + p1, 4 + p2] for p1 in range(2) for p2 in range(2) for c in range(3)]
    assert patches[1, 1 * 3 + 2].tolist() == torch.stack(expected).tolist()
    assert torch.equal(unpatchify(patches, 2, 4, 6), images)
    pixels = patchify(images, 1)  # the palette case: one RGB pixel per token, raster order
    assert pixels.shape == (2, 24, 3) and pixels[0, 7].tolist() == images[0, :, 1, 1].tolist()


def test_patchify_spec_is_time_major():
    mel = torch.randn(2, 8, 12)  # (B, n_mels, n_frames)
    patches = patchify_spec(mel, 4)  # 2 frequency x 3 time patches
    assert patches.shape == (2, 6, 16)
    f, t = 1, 2
    assert torch.equal(patches[0, t * 2 + f], mel[0, f * 4 : f * 4 + 4, t * 4 : t * 4 + 4].reshape(16))
    assert torch.equal(unpatchify_spec(patches, 4, 8, 12), mel)


def test_palette_and_patch_tokens_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    palette = torch.randint(0, 256, (16, 3), generator=g).float()
    cb = Codebook.from_codes(palette)
    tokens = torch.randint(0, 16, (2, 8 * 8), generator=g)
    images = tokens_to_image(cb, tokens, 1, 8, 8)  # (2, 3, 8, 8) made only of palette colours
    assert images.shape == (2, 3, 8, 8)
    assert torch.equal(image_to_tokens(cb, images.to(torch.uint8)), tokens)  # uint8 input as stored on disk
    patch_cb = Codebook.from_codes(torch.randn(10, 4 * 4 * 3, generator=g))
    ptok = torch.randint(0, 10, (2, 4), generator=g)
    assert torch.equal(image_to_tokens(patch_cb, tokens_to_image(patch_cb, ptok, 4, 8, 8), 4), ptok)
    spec_cb = Codebook.from_codes(torch.randn(10, 16, generator=g))
    stok = torch.randint(0, 10, (2, 6), generator=g)
    mel = tokens_to_spec(spec_cb, stok, 4, 8, 12)
    assert mel.shape == (2, 8, 12) and torch.equal(spec_to_tokens(spec_cb, mel, 4), stok)
    torch.save(cb.state_dict(), tmp_path / "codebook.pt")
    clone = Codebook(16, 3)
    clone.load_state_dict(torch.load(tmp_path / "codebook.pt", weights_only=True))
    assert torch.equal(clone.codes, palette)
