"""Build the index directory: embed every prepped image and caption, index the images, write the files and their
provenance atomically. The prep dir, the checkpoint and the output may each be a path or an fsspec URL."""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.clip import CLIP

from tasks.data import loader
from tasks.data.shards import SPLITS, shard_urls
from tasks.index.ann import IndexConfig, build_faiss
from tasks.index.embed import device, embed_images, embed_texts, load_clip
from tasks.infra import storage
from tasks.infra.common import (atomic_dir, code_version, digest, file_sha256, progress, read_success, tree_digest,
                                write_json)

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
PROVENANCE_FILE = "provenance.json"


def prep_digest(prep_dir: Path | str) -> str:
    record = read_success(prep_dir)
    return record["digest"] if record and "digest" in record else tree_digest(prep_dir)


def image_stats(prep_dir: Path | str) -> dict:
    stats_path = storage.join(prep_dir, "stats.json")
    if not storage.isfile(stats_path):
        raise FileNotFoundError(f"{stats_path} does not exist; is {prep_dir} a finished preprocess output?")
    image = json.loads(storage.read_text(stats_path)).get("image")
    if not image:
        raise ValueError(f"{stats_path} has no image statistics: the prep dir holds no images to index")
    return {"size": int(image["size"]), "mean": list(image["mean"]), "std": list(image["std"])}


class CollapsedEmbeddingsError(ValueError):
    """The CLIP's embeddings do not tell images apart: an index of them would rank at random."""


def prepped_images(prep_dir: Path | str, splits=SPLITS) -> Iterator[tuple[dict, np.ndarray]]:
    """(row metadata, uint8 image (3, S, S)) for every image of the given splits, shard by shard in name order
    (test-*, train-*, val-*), through the loader's reader (shards checked intact, decoded as training decodes them)."""
    for split in sorted(splits):
        for tar in shard_urls(prep_dir, "image", split, allow_empty=True):
            shard = f"image/{storage.name(tar)}"  # relative to the prep dir
            for pos, s in enumerate(loader.shard_samples(tar)):
                info = s["info"]
                row = {"key": s["__key__"], "split": split, "label": info.get("label"),
                       "label_id": int(info.get("label_id", -1)), "caption": info.get("text") or None,
                       "shard": shard, "shard_index": pos}
                yield row, s["img"]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _vector_column(x: np.ndarray) -> pa.FixedSizeListArray:
    """(n, E) float32 -> fixed_size_list<float32>[E]."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _absolute(loc: Path | str) -> Path | str:
    loc = storage.location(loc)
    return loc.resolve() if isinstance(loc, Path) else loc


def _embed_prep(prep_dir: Path | str, model: CLIP, stats: dict, dev: torch.device,
                cfg: IndexConfig) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Every prepped image and its caption embedded -> (rows with their faiss id, image embeddings (n, E), caption
    embeddings (n, E), zeros where there is no caption, has-caption mask (n,))."""
    rows: list[dict] = []
    image_emb: list[np.ndarray] = []
    text_emb: list[np.ndarray] = []
    has_text: list[np.ndarray] = []
    for batch in progress(_batches(prepped_images(prep_dir, cfg.splits), cfg.batch_size), desc="index/embed",
                          unit="batch"):
        meta = [r for r, _ in batch]
        image_emb.append(embed_images(model, np.stack([img for _, img in batch]), stats["mean"], stats["std"],
                                      dev, cfg.bf16))
        captioned = np.array([r["caption"] is not None for r in meta])
        t = np.zeros_like(image_emb[-1])
        if captioned.any():
            t[captioned] = embed_texts(model, [r["caption"] for r in meta if r["caption"] is not None], dev,
                                       cfg.bf16)
        text_emb.append(t)
        has_text.append(captioned)
        rows.extend(meta)
    if not rows:
        raise ValueError(f"{storage.join(prep_dir, 'image')} holds no image shards in the splits {cfg.splits}: "
                         "nothing to index")
    for i, r in enumerate(rows):
        r["id"] = i
    return rows, np.concatenate(image_emb), np.concatenate(text_emb), np.concatenate(has_text)


def _tables(rows: list[dict], img: np.ndarray, txt: np.ndarray, valid: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """The row map (faiss id -> key, split, label, caption, shard) and the embeddings table."""
    row_cols = ["id", "key", "split", "label", "label_id", "caption", "shard", "shard_index"]
    row_schema = pa.schema([("id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                            ("label", pa.string()), ("label_id", pa.int32()), ("caption", pa.string()),
                            ("shard", pa.string()), ("shard_index", pa.int32())])
    rows_table = pa.Table.from_pylist([{c: r[c] for c in row_cols} for r in rows], schema=row_schema)
    emb_table = rows_table.select(["id", "key", "split", "label", "caption"])
    emb_table = emb_table.append_column("has_caption", pa.array(valid))
    emb_table = emb_table.append_column("image_emb", _vector_column(img))
    emb_table = emb_table.append_column("text_emb", _vector_column(txt))
    return rows_table, emb_table


def check_spread(img: np.ndarray, txt: np.ndarray, valid: np.ndarray, cfg: IndexConfig) -> dict:
    """Refuse collapsed embeddings (CollapsedEmbeddingsError, one line with the figure and the threshold): image
    embeddings whose mean per-dimension std is under cfg.min_embedding_std, or caption probes (up to 200) that
    more than cfg.max_top1_share of the time find the same top image. Returns both figures."""
    spread = float(img.std(axis=0).mean())
    probes = txt[valid][:200]
    top1 = (probes @ img.T).argmax(1) if len(probes) >= 20 and len(img) > 1 else np.zeros(0, dtype=np.int64)
    share = float(np.bincount(top1).max() / len(top1)) if len(top1) else 0.0
    figures = {"embedding_std": spread, "top1_share": share}
    if spread < cfg.min_embedding_std:
        raise CollapsedEmbeddingsError(
            f"the CLIP's image embeddings have collapsed (mean per-dimension std {spread:.2e} < {cfg.min_embedding_std}"
            "): its hits would be ties; train CLIP longer or on captions that tell images apart")
    if share > cfg.max_top1_share:
        raise CollapsedEmbeddingsError(
            f"the CLIP's embeddings have collapsed: {share:.0%} of {len(top1)} caption probes find the same top image "
            f"(> {cfg.max_top1_share:.0%}); train CLIP longer or on captions that tell images apart")
    return figures


def build_index(prep_dir: Path | str, checkpoint: Path | str, out_dir: Path | str,
                cfg: IndexConfig = IndexConfig()) -> dict:
    """Embed every prepped image and caption with the CLIP at `checkpoint`, index the images, write `out_dir`.

    Returns the `_SUCCESS` record: digest, n, dim, n_captions, index type, recall (None when exact).
    """
    prep_dir, checkpoint = _absolute(prep_dir), _absolute(checkpoint)
    stats = image_stats(prep_dir)
    dev = device(cfg.device)
    model, model_sha = load_clip(checkpoint, dev)
    rows, img, txt, valid = _embed_prep(prep_dir, model, stats, dev, cfg)
    spread = check_spread(img, txt, valid, cfg)

    # the recall sample mixes image->image and caption->image queries, the two ways the index is searched
    rng = np.random.default_rng(cfg.seed)
    half = min(cfg.recall_queries // 2, len(img))
    queries = np.concatenate([img[rng.choice(len(img), half, replace=False)],
                              txt[valid][rng.choice(int(valid.sum()), min(half, int(valid.sum())), replace=False)]])
    index, info = build_faiss(img, cfg, queries=queries if len(queries) else None)
    rows_table, emb_table = _tables(rows, img, txt, valid)

    record: dict = {}
    with atomic_dir(out_dir, record) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        pq.write_table(rows_table, tmp / ROWS_FILE)
        pq.write_table(emb_table, tmp / EMBEDDINGS_FILE)
        files = {name: file_sha256(tmp / name) for name in (INDEX_FILE, ROWS_FILE, EMBEDDINGS_FILE)}
        provenance = {
            "files": files,
            "model": {"checkpoint": str(checkpoint), "sha256": model_sha, "config": dataclasses.asdict(model.cfg)},
            "index": {k: info[k] for k in ("type", "metric", "params", "recall")},
            "n": info["n"],
            "dim": info["dim"],
            "n_captions": int(valid.sum()),
            "splits": list(cfg.splits),
            "spread": spread,
            "prep": {"path": str(prep_dir), "digest": prep_digest(prep_dir)},
            "image": stats,
            "config": cfg,
            "code_version": code_version(sys.modules[__package__]),  # the index package's source
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / PROVENANCE_FILE, provenance)
        record.update(digest=digest(files, model_sha, n=32), n=info["n"], dim=info["dim"],
                      n_captions=int(valid.sum()), index_type=info["type"], recall=info["recall"])
    return record
