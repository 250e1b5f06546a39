"""CLIP index: build, verify provenance, search; the approximate faiss paths against exact search."""

from __future__ import annotations

import dataclasses
import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.vit import ViT, ViTConfig
from tasks.index.build import CollapsedEmbeddingsError, check_spread
from tasks.index.embed import embed_texts
from tasks.infra.checkpoint import load_checkpoint
from tasks.infra.checkpoint import save_checkpoint as save_trainer_checkpoint
from tasks.index import (
    EMBEDDINGS_FILE,
    ROWS_FILE,
    IndexConfig,
    IndexIntegrityError,
    IndexNotFoundError,
    build_faiss,
    build_index,
    format_hits,
    load_index,
    recall_at_k,
    search_image,
    search_text,
    search_vector,
)

from tests.helpers import INDEX_CLIP as TINY
from tests.helpers import INDEX_LABELS as LABELS
from tests.helpers import INDEX_SIZE as SIZE
from tests.helpers import clip_checkpoint as save_checkpoint
from tests.helpers import write_index_prep as write_prep


@pytest.fixture
def built(tmp_path):
    prep = tmp_path / "prep"
    images = write_prep(prep)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "index"
    record = build_index(prep, ckpt, out, IndexConfig(batch_size=8, splits=("train", "val")))
    return {"prep": prep, "ckpt": ckpt, "out": out, "record": record, "images": images}


def test_the_index_holds_the_train_split_by_default(tmp_path):
    write_prep(tmp_path / "prep")
    build_index(tmp_path / "prep", save_checkpoint(tmp_path / "ckpt.pt"), tmp_path / "index", IndexConfig())
    rows = pq.read_table(tmp_path / "index" / ROWS_FILE).to_pylist()
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train"}
    assert json.loads((tmp_path / "index" / "provenance.json").read_text())["splits"] == ["train"]


def test_collapsed_embeddings_are_refused(tmp_path):
    """A CLIP whose weights are all zero embeds every image as the same vector: no index is built."""
    write_prep(tmp_path / "prep")
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "ckpt.pt"))
    ckpt["state_dict"] = {k: torch.zeros_like(v) for k, v in ckpt["state_dict"].items()}
    save_trainer_checkpoint(tmp_path / "blank.pt", ckpt)
    with pytest.raises(CollapsedEmbeddingsError, match=r"collapsed \(mean per-dimension std 0\.00e\+00 < 0\.005\)"):
        build_index(tmp_path / "prep", tmp_path / "blank.pt", tmp_path / "index", IndexConfig())
    assert not (tmp_path / "index").exists()


def test_one_image_that_every_caption_finds_is_a_collapse():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((50, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    valid = np.ones(50, dtype=bool)
    spread = check_spread(img, img, valid, IndexConfig())  # every caption finds its own image
    assert spread["top1_share"] == pytest.approx(1 / 50)
    every_caption_is_image_0 = np.repeat(img[:1], 50, axis=0)
    with pytest.raises(CollapsedEmbeddingsError, match="100% of 50 caption probes find the same top image"):
        check_spread(img, every_caption_is_image_0, valid, IndexConfig())


def test_build_writes_one_row_per_image(built):
    out, images = built["out"], built["images"]
    assert built["record"]["n"] == len(images) == 20 and built["record"]["index_type"] == "flat"
    rows = pq.read_table(out / ROWS_FILE).to_pylist()
    assert [r["id"] for r in rows] == list(range(20))
    assert {r["key"] for r in rows} == set(images)
    assert {r["split"] for r in rows} == {"train", "val"}
    emb = pq.read_table(out / EMBEDDINGS_FILE)
    assert emb.schema.field("image_emb").type.list_size == TINY.embed_dim
    image_emb = np.array(emb.column("image_emb").to_pylist(), dtype=np.float32)
    assert np.allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
    text_emb = np.array(emb.column("text_emb").to_pylist(), dtype=np.float32)
    has_caption = np.array(emb.column("has_caption").to_pylist())
    assert has_caption.sum() == 19 and not has_caption[-1]  # the one image without a caption
    assert np.allclose(np.linalg.norm(text_emb[has_caption], axis=1), 1, atol=1e-5)
    assert not text_emb[~has_caption].any()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["n"] == 20 and prov["dim"] == TINY.embed_dim and prov["index"]["type"] == "flat"
    assert prov["n_captions"] == 19 and prov["index"]["recall"] is None
    assert set(prov["files"]) == {"index.faiss", "rows.parquet", "embeddings.parquet"}
    assert len(prov["model"]["sha256"]) == 64 and prov["prep"]["digest"]


def test_own_embedding_and_own_image_come_first(built, tmp_path):
    loaded = load_index(built["out"])
    emb = pq.read_table(built["out"] / EMBEDDINGS_FILE).to_pylist()
    for row in (emb[0], emb[13]):
        hits = search_vector(loaded, np.array(row["image_emb"]), k=3)
        assert hits[0].key == row["key"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    key = "img-000007"
    path = tmp_path / "query.png"
    Image.fromarray(built["images"][key].transpose(1, 2, 0)).save(path)  # (S, S, 3) RGB
    hits = search_image(loaded, path, k=5)
    assert hits[0].key == key and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].label == LABELS[1] and hits[0].caption == "a square number 7"


def test_text_search_returns_k_sorted_hits(built):
    loaded = load_index(built["out"])
    hits = search_text(loaded, "a circle", k=5)
    assert len(hits) == 5
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    query = embed_texts(loaded.model, ["a circle"], loaded.device)[0]  # the scores are the images' cosines to it
    images = {r["key"]: np.array(r["image_emb"]) for r in pq.read_table(built["out"] / EMBEDDINGS_FILE).to_pylist()}
    assert scores == pytest.approx([float(images[h.key] @ query) for h in hits], abs=1e-4)
    assert len(search_text(loaded, "a circle", k=100)) == 20
    text = format_hits(hits, loaded.provenance)
    assert hits[0].key in text and loaded.provenance["model"]["sha256"][:12] in text
    assert loaded.provenance["files"]["index.faiss"][:12] in text


def test_changed_row_map_is_refused(built):
    path = built["out"] / ROWS_FILE
    rows = pq.read_table(path).to_pylist()
    rows[0]["caption"] = "something else"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    with pytest.raises(IndexIntegrityError, match=r"rows\.parquet changed.*rebuild with `tessera index`"):
        load_index(built["out"])


def test_replaced_checkpoint_is_refused(built):
    save_checkpoint(built["ckpt"], seed=1)  # same path, different weights
    with pytest.raises(IndexIntegrityError, match=r"checkpoint .*ckpt\.pt changed.*rebuild with `tessera index`"):
        load_index(built["out"])


def test_missing_file_is_refused(built):
    (built["out"] / EMBEDDINGS_FILE).unlink()
    with pytest.raises(IndexIntegrityError, match=r"embeddings\.parquet is missing"):
        load_index(built["out"])


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match=r"no index at .* yet; run `tessera index` \(or `tessera run`\) first"):
        load_index(tmp_path / "nothing")
    (tmp_path / "unfinished").mkdir()  # no _SUCCESS: an interrupted build
    with pytest.raises(IndexNotFoundError, match="no index at"):
        load_index(tmp_path / "unfinished")


def test_bf16_embeddings_still_find_themselves(tmp_path):
    write_prep(tmp_path / "prep", n_per_split=4)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt")
    build_index(tmp_path / "prep", ckpt, tmp_path / "index", IndexConfig(bf16=True))
    loaded = load_index(tmp_path / "index")
    row = pq.read_table(tmp_path / "index" / EMBEDDINGS_FILE).to_pylist()[3]
    assert search_vector(loaded, np.array(row["image_emb"]), k=1)[0].key == row["key"]


def test_only_an_image_clip_checkpoint_builds_an_index(tmp_path):
    write_prep(tmp_path / "prep", n_per_split=2)
    with pytest.raises(FileNotFoundError, match=r"CLIP checkpoint .*nothing\.pt does not exist; train one"):
        build_index(tmp_path / "prep", tmp_path / "nothing.pt", tmp_path / "index")
    vit = ViTConfig(img_size=SIZE, patch_size=4, dim=16, depth=1, n_heads=2, n_classes=2)
    save_trainer_checkpoint(tmp_path / "vit.pt", {"model": "vit", "config": dataclasses.asdict(vit),
                                                  "state_dict": ViT(vit).state_dict()})
    with pytest.raises(ValueError, match=r"vit\.pt is a 'vit' model, not a CLIP; the index needs a CLIP"):
        build_index(tmp_path / "prep", tmp_path / "vit.pt", tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[3, 2, -1], [7, 8, 9]]), exact, 3) == pytest.approx(2 / 6)
    assert recall_at_k(np.array([[1, 9, 9]]), np.array([[1, 2, 3]]), 1) == 1.0


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_small_collections_are_exact():
    x = _unit(np.random.default_rng(0).normal(size=(100, 8)))
    index, info = build_faiss(x, IndexConfig())
    assert info["type"] == "flat" and info["recall"] is None and isinstance(index, faiss.IndexFlatIP)
    with pytest.raises(ValueError, match="L2-normalised"):
        build_faiss(x * 2, IndexConfig())


@pytest.mark.parametrize("approx", ["ivf", "hnsw"])
def test_approximate_index_reaches_recall(approx, tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(3000, 32)))
    cfg = IndexConfig(exact_threshold=1000, approx=approx, recall_queries=200)
    index, info = build_faiss(x, cfg)
    assert info["type"] == approx and info["recall"]["value"] >= 0.9
    # an independent check on fresh queries, through a write/read round trip (the tuned knob must survive it)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    index = faiss.read_index(str(tmp_path / "i.faiss"))
    q = _unit(x[rng.choice(3000, 100, replace=False)] + 0.3 * rng.normal(size=(100, 32)))
    _, exact = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, got = index.search(q, 10)
    assert recall_at_k(got, exact, 10) >= 0.9
