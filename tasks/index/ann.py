"""The faiss index over L2-normalised embeddings: exact below a threshold, IVF-Flat or HNSW above it, with the
search knob (nprobe, efSearch) tuned until recall@k against exact search meets the target."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per IVF list

log = logging.getLogger(__name__)


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
    splits: tuple[str, ...] = ("train",)  # which splits' images are indexed (the test split stays unseen)
    # collapse checks (build.check_spread): the mean per-dimension std of the unit image embeddings (random unit
    # vectors in E dimensions: about 1/sqrt(E), 0.125 at E=64), and the largest share of caption probes whose top
    # hit is one and the same image
    min_embedding_std: float = 0.005
    max_top1_share: float = 0.5

    def __post_init__(self):
        if self.approx not in ("hnsw", "ivf"):
            raise ValueError(f"approx={self.approx!r}: expected 'hnsw' or 'ivf'")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device={self.device!r}: expected 'cpu', 'cuda' or 'auto'")
        if min(self.batch_size, self.nprobe, self.hnsw_m, self.ef_search, self.recall_k, self.recall_queries) < 1:
            raise ValueError("batch_size, nprobe, hnsw_m, ef_search, recall_k and recall_queries must be >= 1")
        if not 0 <= self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall} must be in [0, 1]")
        if not self.splits or set(self.splits) - {"train", "val", "test"}:
            raise ValueError(f"splits={self.splits}: choose among train, val, test")
        object.__setattr__(self, "splits", tuple(self.splits))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k; ids (Q, >=k), -1 (faiss's "no result") never counts."""
    approx_ids, exact_ids = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if len(approx_ids) != len(exact_ids):
        raise ValueError(f"{len(approx_ids)} approximate vs {len(exact_ids)} exact result rows")
    if len(exact_ids) == 0:
        return 1.0
    found = sum(len((set(a.tolist()) - {-1}) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
    return found / (k * len(exact_ids))


def set_knob(index: faiss.Index, name: str, value: int) -> None:
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
        set_knob(index, knob, value)
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
