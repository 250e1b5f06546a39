import numpy as np
import pytest
import torch

from tasks.data.codebook import CodebookCollapseError, CodebookConfig, fit_codebooks, load_codebook


def _prep(tmp_path, pixels, image=None):
    (tmp_path / "prep" / "patches").mkdir(parents=True)
    np.save(tmp_path / "prep" / "patches" / "pixels.npy", pixels)
    if image is not None:
        np.save(tmp_path / "prep" / "patches" / "image.npy", image)
    return tmp_path / "prep"


def test_fit_save_load(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, size=(8, 3))
    pixels = np.clip(centres[rng.integers(0, 8, 4000)] + rng.normal(0, 2, (4000, 3)), 0, 255).astype(np.uint8)
    image = rng.integers(0, 256, size=(3000, 48)).astype(np.uint8)
    cfg = CodebookConfig(pixels_k=8, image_k=16, iters=15)
    record = fit_codebooks(_prep(tmp_path, pixels, image), cfg, tmp_path / "cb")
    assert set(record["codebooks"]) == {"pixels", "image"}  # no mel sample -> no mel codebook
    assert record["metrics"]["pixels"]["usage"] == 1.0
    assert record["metrics"]["pixels"]["mse"] < 10  # recovered the 8 colours (noise variance 4 per channel)
    cb = load_codebook(tmp_path / "cb" / "pixels.pt")
    assert cb.codes.shape == (8, 3)
    x = torch.from_numpy(pixels[:100].astype(np.float32))
    assert torch.allclose(cb.decode(cb.encode(x)), x, atol=12)
    assert (tmp_path / "cb" / "pixels_usage.png").stat().st_size > 1000


def test_collapsed_codebook_fails_the_stage(tmp_path):
    pixels = np.array([[0, 0, 0], [255, 255, 255]] * 500, dtype=np.uint8)  # two colours, 16 codes
    with pytest.raises(CodebookCollapseError, match="pixels codebook uses"):
        fit_codebooks(_prep(tmp_path, pixels), CodebookConfig(pixels_k=16, min_usage=0.5), tmp_path / "cb")
    assert not (tmp_path / "cb").exists()


def test_missing_codebook_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="codebook stage"):
        load_codebook(tmp_path / "nope.pt")
