"""CLIP index: tasks.index.build_faiss (HNSW, efSearch tuned to recall@10 >= 0.95) vs exact search (IndexFlatIP).

Vectors: clustered, L2-normalised, dim 64 (CLIPConfig's embedding size in tasks/train/table.py). The tuning queries
and the measured queries are different held-out vectors (near the data, not in it). Latency is per query, from
batches of 100 queries; recall@10 of the HNSW results against the exact ones on the measured queries.
The target (recall >= 0.95 at >= 10x lower latency) is stated for 1M vectors (issue #6); the 10k and 100k rows are
reported beside it, with the index type build_faiss picks at that size by default (exact below
IndexConfig.exact_threshold, where a flat scan is already fast).
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from benchmarks.common import Row, interleaved, median
from tasks.index import IndexConfig, build_faiss, recall_at_k

DIM = 64
K = 10
N_QUERIES = 100
INNER = 10


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=n)] + rng.normal(0, 0.35 / np.sqrt(dim), size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def one(n: int, reps: int) -> Row:
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(max(10, n // 100), DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = clustered(n, DIM, rng, centres)
    tune_q = clustered(1000, DIM, rng, centres)
    q = clustered(N_QUERIES, DIM, rng, centres)
    t0 = time.perf_counter()
    hnsw, info = build_faiss(x, IndexConfig(exact_threshold=0, approx="hnsw"), queries=tune_q)
    build_s = time.perf_counter() - t0
    default_type = "flat" if n < IndexConfig().exact_threshold else IndexConfig().approx
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    res = {}

    def exact():  # INNER batches of N_QUERIES per timed call: one batch takes too few ms to time alone
        for _ in range(INNER):
            res["exact"] = flat.search(q, K)[1]

    def approx():
        for _ in range(INNER):
            res["hnsw"] = hnsw.search(q, K)[1]

    times = interleaved({"exact": exact, "hnsw": approx}, reps)
    te, th = (median(times[k]) / (N_QUERIES * INNER) for k in ("exact", "hnsw"))
    recall = recall_at_k(res["hnsw"], res["exact"], K)
    ratio = te / th
    at_target = n >= 1_000_000
    target = ">= 10 (and recall >= 0.95)" if at_target else "report"
    passed = (recall >= 0.95 and ratio >= 10) if at_target else None
    note = (f"HNSW built in {build_s:.0f} s (efSearch tuned on 1000 other queries); build_faiss's default at this "
            f"size: {default_type}")
    if not at_target:
        note = (f"report only: the target is set at 1M vectors; {ratio:.1f}x faster"
                f"{' (exact search over so few vectors is itself fast)' if ratio < 10 else ''}; " + note)
    elif not passed:
        why = []
        if recall < 0.95:
            why.append(f"recall@10 {recall:.3f} < 0.95 on held-out queries (tuned on others)")
        if ratio < 10:
            why.append(f"only {ratio:.1f}x faster than exact search")
        note = "miss: " + "; ".join(why) + "; " + note
    return Row(f"index_{n // 1000}k" if n < 1_000_000 else "index_1M",
               "latency ratio (flat ms/query / hnsw ms/query), recall@10 >= 0.95 also required",
               f"{n} x {DIM} clustered unit vectors, {N_QUERIES} queries per batch, k={K}",
               f"IndexFlatIP: {te * 1e3:.4f} ms/query", f"HNSW {info['params']}: {th * 1e3:.4f} ms/query, "
               f"recall@10 {recall:.3f}", round(ratio, 2), target, passed, note,
               extra={"recall_at_10": recall, "tuning_recall": info["recall"], "seconds_per_10_batches": times,
                      "hnsw_build_s": build_s, "default_index_type": default_type})


def run(quick: bool = False) -> list[Row]:
    sizes = [2000] if quick else [10_000, 100_000, 1_000_000]
    return [one(n, 3 if quick else (7 if n < 1_000_000 else 3)) for n in sizes]
