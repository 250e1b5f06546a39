"""Open a finished index (a path or an fsspec URL), verify it against its provenance, and answer queries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.clip import CLIP
from tasks.infra import storage
from tasks.infra.common import file_sha256, read_success
from tasks.data.features import image_array
from tasks.index.ann import set_knob
from tasks.index.build import INDEX_FILE, PROVENANCE_FILE, ROWS_FILE
from tasks.index.embed import device as torch_device
from tasks.index.embed import embed_images, embed_texts, load_clip

REBUILD = "rebuild with `tessera index`"


class IndexIntegrityError(RuntimeError):
    """The index directory no longer matches its provenance (a file or the CLIP checkpoint changed)."""


class IndexNotFoundError(FileNotFoundError):
    """No finished index where one was asked for."""


class Hit(NamedTuple):
    key: str
    caption: str | None
    label: str | None
    score: float  # cosine similarity
    split: str


@dataclass
class LoadedIndex:
    """A verified index with the CLIP that built it, ready to answer queries."""

    path: Path | str
    index: faiss.Index
    rows: pa.Table  # id, key, split, label, label_id, caption, shard, shard_index
    provenance: dict
    model: CLIP
    device: torch.device

    def hit(self, row: int, score: float) -> Hit:
        r = self.rows.slice(row, 1).to_pylist()[0]
        return Hit(r["key"], r["caption"], r["label"], float(score), r["split"])


# ---------------------------------------------------------------------------------------------------------- load


def verify_index(out_dir: Path | str, provenance: dict) -> None:
    """Recompute the sha256 of every recorded file and of the CLIP checkpoint; raise IndexIntegrityError on any
    difference."""
    for name, expected in provenance["files"].items():
        path = storage.join(out_dir, name)
        if not storage.isfile(path):
            raise IndexIntegrityError(f"{path} is missing from the index; {REBUILD}")
        actual = file_sha256(path)
        if actual != expected:
            raise IndexIntegrityError(
                f"{path} changed since the index was built (sha256 {actual[:12]} != recorded {expected[:12]}); "
                f"{REBUILD}")
    ckpt, expected = storage.location(provenance["model"]["checkpoint"]), provenance["model"]["sha256"]
    if not storage.isfile(ckpt):
        raise IndexIntegrityError(f"CLIP checkpoint {ckpt} that built the index at {out_dir} is gone; {REBUILD}")
    actual = file_sha256(ckpt)
    if actual != expected:
        raise IndexIntegrityError(
            f"CLIP checkpoint {ckpt} changed since the index was built (sha256 {actual[:12]} != recorded "
            f"{expected[:12]}): its embeddings would not match the index; {REBUILD}")


def _read_index(path: Path | str) -> faiss.Index:
    if isinstance(path, Path):
        return faiss.read_index(str(path))
    return faiss.deserialize_index(np.frombuffer(storage.read_bytes(path), dtype=np.uint8))


def load_index(out_dir: Path | str, device: str = "cpu") -> LoadedIndex:
    """Open a finished index (a folder or an fsspec URL), verify it against its provenance, and load the CLIP that
    built it."""
    out_dir = storage.location(out_dir)
    provenance_path = storage.join(out_dir, PROVENANCE_FILE)
    if read_success(out_dir) is None or not storage.isfile(provenance_path):
        raise IndexNotFoundError(f"no index at {out_dir} yet; run `tessera index` (or `tessera run`) first")
    provenance = json.loads(storage.read_text(provenance_path))
    verify_index(out_dir, provenance)
    dev = torch_device(device)
    model, model_sha = load_clip(storage.location(provenance["model"]["checkpoint"]), dev)
    if model_sha != provenance["model"]["sha256"]:  # the checkpoint was replaced between the check and the read
        raise IndexIntegrityError(f"CLIP checkpoint {provenance['model']['checkpoint']} changed while loading; "
                                  f"{REBUILD}")
    index = _read_index(storage.join(out_dir, INDEX_FILE))
    with storage.open(storage.join(out_dir, ROWS_FILE)) as f:
        rows = pq.read_table(f)
    n, dim = provenance["n"], provenance["dim"]
    if not (index.ntotal == rows.num_rows == n and index.d == dim == model.cfg.embed_dim):
        raise IndexIntegrityError(
            f"index at {out_dir} is inconsistent (faiss rows {index.ntotal}, row map {rows.num_rows}, recorded {n}; "
            f"dims {index.d}/{model.cfg.embed_dim}/{dim}); {REBUILD}")
    if rows.column("id").to_pylist() != list(range(n)):
        raise IndexIntegrityError(f"{storage.join(out_dir, ROWS_FILE)} ids are not the faiss rows 0..{n - 1}; "
                                  f"{REBUILD}")
    for knob, value in provenance["index"]["params"].items():
        if knob in ("nprobe", "efSearch"):
            set_knob(index, knob, value)
    return LoadedIndex(out_dir, index, rows, provenance, model, dev)


# ---------------------------------------------------------------------------------------------------------- search


def search_vector(loaded: LoadedIndex, vector: np.ndarray, k: int = 5) -> list[Hit]:
    """The k nearest images to one query embedding (E,) by cosine similarity, best first."""
    q = np.asarray(vector, dtype=np.float32).reshape(1, -1)  # (1, E)
    if q.shape[1] != loaded.index.d:
        raise ValueError(f"query has dim {q.shape[1]}, the index {loaded.index.d}")
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    scores, ids = loaded.index.search(q, min(k, loaded.index.ntotal))
    return [loaded.hit(int(i), s) for i, s in zip(ids[0], scores[0]) if i >= 0]


def search_text(loaded: LoadedIndex, text: str, k: int = 5) -> list[Hit]:
    """Images whose CLIP embedding is nearest to the caption `text`."""
    return search_vector(loaded, embed_texts(loaded.model, [text], loaded.device)[0], k)


def search_image(loaded: LoadedIndex, image_path: Path | str, k: int = 5) -> list[Hit]:
    """Images nearest to the picture at `image_path`, prepared as preprocess does (centre crop, bicubic resize,
    the prep dir's mean/std)."""
    image_path = storage.location(image_path)
    if not storage.isfile(image_path):
        raise FileNotFoundError(f"query image {image_path} does not exist")
    stats = loaded.provenance["image"]
    img = image_array(storage.read_bytes(image_path), stats["size"])  # (3, S, S) uint8
    z = embed_images(loaded.model, img[None], stats["mean"], stats["std"], loaded.device)[0]  # (E,)
    return search_vector(loaded, z, k)


def _clip(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits(hits: list[Hit], provenance: dict) -> str:
    """A table of hits under a line naming the model and index versions they came from."""
    index = provenance["index"]
    recall = index.get("recall")
    header = (f"model {provenance['model']['sha256'][:12]} ({provenance['model']['checkpoint']})  "
              f"index {provenance['files'][INDEX_FILE][:12]} {index['type']} n={provenance['n']} "
              f"dim={provenance['dim']}" + (f" recall@{recall['k']}={recall['value']:.3f}" if recall else " exact"))
    if not hits:
        return header + "\nno hits"
    kw = max(3, *(len(h.key) for h in hits))
    lines = [header, f"{'#':>3}  {'score':>6}  {'key':<{kw}}  {'split':<5}  {'label':<12}  caption"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"{rank:>3}  {h.score:>6.3f}  {h.key:<{kw}}  {h.split:<5}  {_clip(h.label, 12):<12}  "
                     f"{_clip(h.caption, 70)}")
    return "\n".join(lines)
