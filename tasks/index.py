"""CLIP retrieval index: embed every image and caption with a trained CLIP, index the images with faiss, search.

Output directory (written atomically, like every task's):
    index.faiss          faiss index over the L2-normalised image embeddings; inner product = cosine similarity
    rows.parquet         faiss row id -> key, split, label, caption, shard (relative to the prep dir), position in it
    embeddings.parquet   id, key, split, label, caption, has_caption, image_emb and text_emb as
                         fixed_size_list<float32>[E]; text_emb is all zeros where has_caption is false (a null
                         fixed-size list does not survive Parquet in pyarrow <= 25: apache/arrow#35692)
    provenance.json      sha256 of each file above and of the CLIP checkpoint, index type and parameters, n, dim,
                         measured recall (approximate indexes), the prep dir digest and its image statistics
Below `exact_threshold` vectors the index is exact (IndexFlatIP). Above it, IVF-Flat or HNSW: recall@k against exact
search is measured on a sample of queries (image and caption embeddings) and the search-time knob (nprobe, efSearch)
is doubled until `target_recall` is met; the value reached and its recall are recorded.
`load_index` recomputes every digest and refuses a mismatch, so hits never come from a model or a row map other
than the ones the index was built with.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from models.clip import CLIP, CLIPConfig
from models.tokenizer import ByteTokenizer
from tasks.common import (
    atomic_dir,
    code_version,
    digest,
    file_sha256,
    progress,
    read_success,
    sha256_bytes,
    tree_digest,
    write_json,
)
from tasks.features import image_array
from tasks.shards import read_samples

INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
PROVENANCE_FILE = "provenance.json"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per IVF list
REBUILD = "rebuild with `tessera index`"

log = logging.getLogger(__name__)


class IndexIntegrityError(RuntimeError):
    """The index directory no longer matches its provenance (a file or the CLIP checkpoint changed)."""


class IndexNotFoundError(FileNotFoundError):
    """No finished index where one was asked for."""


@dataclass(frozen=True)
class IndexConfig:
    batch_size: int = 256  # images or captions per forward pass
    device: str = "cpu"  # "cpu", "cuda", "auto"
    bf16: bool = False  # bf16 autocast while embedding (embeddings are re-normalised in float32)
    exact_threshold: int = 50_000  # below this many images: IndexFlatIP
    approx: str = "hnsw"  # above it: "hnsw" (IndexHNSWFlat) or "ivf" (IndexIVFFlat)
    nlist: int | None = None  # IVF lists; None: 4*sqrt(n), at most n / MIN_POINTS_PER_CENTROID
    nprobe: int = 16  # IVF lists scanned per query (starting value of the recall tuning)
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80
    ef_search: int = 64  # HNSW candidate list per query (starting value of the recall tuning)
    recall_k: int = 10
    recall_queries: int = 1000  # sample size for the recall measurement
    target_recall: float = 0.95  # the search knob is doubled until recall@k reaches this (0: measure only)
    seed: int = 0

    def __post_init__(self):
        if self.approx not in ("hnsw", "ivf"):
            raise ValueError(f"approx={self.approx!r}: expected 'hnsw' or 'ivf'")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r}: expected 'cpu', 'cuda' or 'auto'")
        if min(self.batch_size, self.nprobe, self.hnsw_m, self.ef_search, self.recall_k, self.recall_queries) < 1:
            raise ValueError("batch_size, nprobe, hnsw_m, ef_search, recall_k and recall_queries must be >= 1")
        if not 0 <= self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall} must be in [0, 1]")


class Hit(NamedTuple):
    key: str
    caption: str | None
    label: str | None
    score: float  # cosine similarity
    split: str


@dataclass
class LoadedIndex:
    """A verified index with the CLIP that built it, ready to answer queries."""

    path: Path
    index: faiss.Index
    rows: pa.Table  # id, key, split, label, label_id, caption, shard, shard_index
    provenance: dict
    model: CLIP
    device: torch.device

    def hit(self, row: int, score: float) -> Hit:
        r = self.rows.slice(row, 1).to_pylist()[0]
        return Hit(r["key"], r["caption"], r["label"], float(score), r["split"])


# ---------------------------------------------------------------------------------------------------------- faiss


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k; ids (Q, >=k), -1 (faiss's "no result") never counts."""
    approx_ids, exact_ids = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if len(approx_ids) != len(exact_ids):
        raise ValueError(f"{len(approx_ids)} approximate vs {len(exact_ids)} exact result rows")
    if len(exact_ids) == 0:
        return 1.0
    found = sum(len((set(a.tolist()) - {-1}) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
    return found / (k * len(exact_ids))


def _set_knob(index: faiss.Index, name: str, value: int) -> None:
    faiss.ParameterSpace().set_index_parameter(index, name, value)


def build_faiss(vectors: np.ndarray, cfg: IndexConfig, queries: np.ndarray | None = None) -> tuple[faiss.Index, dict]:
    """Index L2-normalised vectors (n, E) for inner-product search -> (index, info).

    info: type ("flat", "ivf", "hnsw"), metric, n, dim, params (the search knob at the value recall tuning reached)
    and, for approximate indexes, recall {k, value, queries, target} measured against exact search. `queries`
    (Q, E) are the recall sample; by default up to cfg.recall_queries rows of `vectors`.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, E)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty (n, dim) array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise ValueError("vectors must be L2-normalised (inner product is used as cosine similarity)")
    n, dim = x.shape
    info: dict = {"metric": "inner_product", "n": n, "dim": dim, "recall": None}
    if n < cfg.exact_threshold:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index, info | {"type": "flat", "params": {}}

    if cfg.approx == "ivf":
        nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit-norm centroids: k-means on the sphere, matching the metric
        index.cp.seed = cfg.seed
        index.train(x)
        index.add(x)
        knob, value, cap = "nprobe", min(cfg.nprobe, nlist), nlist
        params = {"nlist": nlist}
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.add(x)
        knob, value, cap = "efSearch", cfg.ef_search, max(cfg.ef_search, 4096)
        params = {"M": cfg.hnsw_m, "efConstruction": cfg.ef_construction}

    k = min(cfg.recall_k, n)
    if queries is None:
        rng = np.random.default_rng(cfg.seed)
        queries = x[rng.choice(n, size=min(cfg.recall_queries, n), replace=False)]
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, E)
    _, exact = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)  # brute force, no copy of x
    while True:  # double the knob until the recall target (or the knob's ceiling) is reached
        _set_knob(index, knob, value)
        _, approx = index.search(q, k)
        recall = recall_at_k(approx, exact, k)
        if recall >= cfg.target_recall or value >= cap:
            break
        value = min(2 * value, cap)
    if recall < cfg.target_recall:
        log.warning("%s index reaches recall@%d=%.3f < target %.2f at %s=%d (its ceiling)", cfg.approx, k, recall,
                    cfg.target_recall, knob, value)
    params[knob] = value
    recall_info = {"k": k, "value": recall, "queries": len(q), "target": cfg.target_recall}
    return index, info | {"type": cfg.approx, "params": params, "recall": recall_info}


# ---------------------------------------------------------------------------------------------------------- model


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _load_clip(checkpoint: Path, device: torch.device) -> tuple[CLIP, str]:
    """Read the checkpoint once: (CLIP in eval mode, sha256 of exactly the bytes its weights came from)."""
    data = Path(checkpoint).read_bytes()
    ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    cfg = CLIPConfig(**ckpt["config"])
    if cfg.tower != "image":
        raise ValueError(f"checkpoint {checkpoint} is a CLIP with an {cfg.tower} tower; the index embeds images")
    model = CLIP(cfg).to(device)
    model.load_state_dict(ckpt["state_dict"])  # the trainer's checkpoint format (tasks/train.py)
    return model.eval(), sha256_bytes(data)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def embed_images(model: CLIP, images: np.ndarray, mean, std, device: torch.device, bf16: bool = False) -> np.ndarray:
    """uint8 images (B, 3, S, S) -> unit-norm float32 embeddings (B, E); pixels scaled to 0..1, then (x - mean) / std
    per channel with the prep dir's train statistics (stats.json, 0..1 scale)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255)  # (B, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    with _autocast(device, bf16):
        z = model.encode_image((x - m) / s, normalize=True)  # (B, E)
    return F.normalize(z.float(), dim=-1).cpu().numpy()


@torch.no_grad()
def embed_texts(model: CLIP, texts: list[str], device: torch.device, bf16: bool = False) -> np.ndarray:
    """B strings -> unit-norm float32 embeddings (B, E), byte-tokenised to the model's context length."""
    tokens = ByteTokenizer().batch_encode(texts, model.cfg.context_len).to(device)  # (B, Ls)
    with _autocast(device, bf16):
        z = model.encode_text(tokens, normalize=True)  # (B, E)
    return F.normalize(z.float(), dim=-1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------- build


def _prep_digest(prep_dir: Path) -> str:
    record = read_success(prep_dir)
    return record["digest"] if record and "digest" in record else tree_digest(prep_dir)


def _image_stats(prep_dir: Path) -> dict:
    stats_path = prep_dir / "stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} does not exist; is {prep_dir} a finished preprocess output?")
    image = json.loads(stats_path.read_text()).get("image")
    if not image:
        raise ValueError(f"{stats_path} has no image statistics: the prep dir holds no images to index")
    return {"size": int(image["size"]), "mean": list(image["mean"]), "std": list(image["std"])}


def _prepped_images(prep_dir: Path) -> Iterator[tuple[dict, np.ndarray]]:
    """(row metadata, uint8 image (3, S, S)) for every image of every split, shard by shard in name order."""
    for tar in sorted((prep_dir / "image").glob("*.tar")):
        split = tar.name.rsplit("-", 1)[0]  # {split}-000000.tar
        shard = str(tar.relative_to(prep_dir))
        for pos, s in enumerate(read_samples([str(tar)])):
            info = json.loads(s["json"])
            row = {"key": s["__key__"], "split": split, "label": info.get("label"),
                   "label_id": int(info.get("label_id", -1)), "caption": info.get("text") or None,
                   "shard": shard, "shard_index": pos}
            yield row, np.load(io.BytesIO(s["img.npy"]))


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


def index_dir(root: Path, prep_dir: Path, checkpoint: Path, cfg: IndexConfig) -> Path:
    """The content-addressed output directory for an index of `prep_dir` by `checkpoint` under `root`."""
    key = digest(_prep_digest(Path(prep_dir)), file_sha256(checkpoint), cfg, code_version(sys.modules[__name__]))
    return Path(root) / "index" / key


def build_index(prep_dir: Path, checkpoint: Path, out_dir: Path, cfg: IndexConfig = IndexConfig()) -> dict:
    """Embed every prepped image and caption with the CLIP at `checkpoint`, index the images, write `out_dir`.

    Returns the `_SUCCESS` record: digest, n, dim, n_captions, index type, recall (None when exact).
    """
    prep_dir, checkpoint = Path(prep_dir).resolve(), Path(checkpoint).resolve()
    stats = _image_stats(prep_dir)
    device = _device(cfg.device)
    model, model_sha = _load_clip(checkpoint, device)

    rows: list[dict] = []
    image_emb: list[np.ndarray] = []
    text_emb: list[np.ndarray] = []
    has_text: list[np.ndarray] = []
    for batch in progress(_batches(_prepped_images(prep_dir), cfg.batch_size), desc="index/embed", unit="batch"):
        meta = [r for r, _ in batch]
        image_emb.append(embed_images(model, np.stack([img for _, img in batch]), stats["mean"], stats["std"],
                                      device, cfg.bf16))
        captioned = np.array([r["caption"] is not None for r in meta])
        t = np.zeros_like(image_emb[-1])
        if captioned.any():
            t[captioned] = embed_texts(model, [r["caption"] for r in meta if r["caption"] is not None], device,
                                       cfg.bf16)
        text_emb.append(t)
        has_text.append(captioned)
        rows.extend(meta)
    if not rows:
        raise ValueError(f"{prep_dir / 'image'} holds no image shards: nothing to index")
    img = np.concatenate(image_emb)  # (n, E)
    txt = np.concatenate(text_emb)  # (n, E), zeros where there is no caption
    valid = np.concatenate(has_text)  # (n,)
    for i, r in enumerate(rows):
        r["id"] = i

    # the recall sample mixes image->image and caption->image queries, the two ways the index is searched
    rng = np.random.default_rng(cfg.seed)
    half = min(cfg.recall_queries // 2, len(img))
    queries = np.concatenate([img[rng.choice(len(img), half, replace=False)],
                              txt[valid][rng.choice(int(valid.sum()), min(half, int(valid.sum())), replace=False)]])
    index, info = build_faiss(img, cfg, queries=queries if len(queries) else None)

    row_cols = ["id", "key", "split", "label", "label_id", "caption", "shard", "shard_index"]
    row_schema = pa.schema([("id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                            ("label", pa.string()), ("label_id", pa.int32()), ("caption", pa.string()),
                            ("shard", pa.string()), ("shard_index", pa.int32())])
    rows_table = pa.Table.from_pylist([{c: r[c] for c in row_cols} for r in rows], schema=row_schema)
    emb_table = rows_table.select(["id", "key", "split", "label", "caption"])
    emb_table = emb_table.append_column("has_caption", pa.array(valid))
    emb_table = emb_table.append_column("image_emb", _vector_column(img))
    emb_table = emb_table.append_column("text_emb", _vector_column(txt))

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
            "prep": {"path": str(prep_dir), "digest": _prep_digest(prep_dir)},
            "image": stats,
            "config": cfg,
            "code_version": code_version(sys.modules[__name__]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / PROVENANCE_FILE, provenance)
        record.update(digest=digest(files, model_sha, n=32), n=info["n"], dim=info["dim"],
                      n_captions=int(valid.sum()), index_type=info["type"], recall=info["recall"])
    return record


# ---------------------------------------------------------------------------------------------------------- load


def verify_index(out_dir: Path, provenance: dict) -> None:
    """Recompute the sha256 of every recorded file and of the CLIP checkpoint; raise IndexIntegrityError on any
    difference."""
    for name, expected in provenance["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise IndexIntegrityError(f"{path} is missing from the index; {REBUILD}")
        actual = file_sha256(path)
        if actual != expected:
            raise IndexIntegrityError(
                f"{path} changed since the index was built (sha256 {actual[:12]} != recorded {expected[:12]}); "
                f"{REBUILD}")
    ckpt, expected = Path(provenance["model"]["checkpoint"]), provenance["model"]["sha256"]
    if not ckpt.is_file():
        raise IndexIntegrityError(f"CLIP checkpoint {ckpt} that built the index at {out_dir} is gone; {REBUILD}")
    actual = file_sha256(ckpt)
    if actual != expected:
        raise IndexIntegrityError(
            f"CLIP checkpoint {ckpt} changed since the index was built (sha256 {actual[:12]} != recorded "
            f"{expected[:12]}): its embeddings would not match the index; {REBUILD}")


def load_index(out_dir: Path, device: str = "cpu") -> LoadedIndex:
    """Open a finished index, verify it against its provenance, and load the CLIP that built it."""
    out_dir = Path(out_dir)
    if read_success(out_dir) is None or not (out_dir / PROVENANCE_FILE).is_file():
        raise IndexNotFoundError(f"no index at {out_dir} yet; run `tessera index` (or `tessera run`) first")
    provenance = json.loads((out_dir / PROVENANCE_FILE).read_text())
    verify_index(out_dir, provenance)
    dev = _device(device)
    model, model_sha = _load_clip(Path(provenance["model"]["checkpoint"]), dev)
    if model_sha != provenance["model"]["sha256"]:  # the checkpoint was replaced between the check and the read
        raise IndexIntegrityError(f"CLIP checkpoint {provenance['model']['checkpoint']} changed while loading; {REBUILD}")
    index = faiss.read_index(str(out_dir / INDEX_FILE))
    rows = pq.read_table(out_dir / ROWS_FILE)
    n, dim = provenance["n"], provenance["dim"]
    if not (index.ntotal == rows.num_rows == n and index.d == dim == model.cfg.embed_dim):
        raise IndexIntegrityError(
            f"index at {out_dir} is inconsistent (faiss rows {index.ntotal}, row map {rows.num_rows}, recorded {n}; "
            f"dims {index.d}/{model.cfg.embed_dim}/{dim}); {REBUILD}")
    if rows.column("id").to_pylist() != list(range(n)):
        raise IndexIntegrityError(f"{out_dir / ROWS_FILE} ids are not the faiss rows 0..{n - 1}; {REBUILD}")
    for knob, value in provenance["index"]["params"].items():
        if knob in ("nprobe", "efSearch"):
            _set_knob(index, knob, value)
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


def search_image(loaded: LoadedIndex, image_path: Path, k: int = 5) -> list[Hit]:
    """Images nearest to the picture at `image_path`, prepared as preprocess does (centre crop, bicubic resize,
    the prep dir's mean/std)."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"query image {image_path} does not exist")
    stats = loaded.provenance["image"]
    img = image_array(image_path.read_bytes(), stats["size"])  # (3, S, S) uint8
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
