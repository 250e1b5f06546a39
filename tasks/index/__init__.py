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
than the ones the index was built with. The prep dir, the checkpoint and the index directory may be paths or fsspec
URLs (s3://, gs://, memory://; tasks/infra/storage.py).

    ann.py     IndexConfig, build_faiss (exact / IVF / HNSW, recall tuning), recall_at_k
    embed.py   the CLIP from a checkpoint (tasks/train/table.py); images and captions -> unit-norm embeddings
    build.py   build_index: embed the prep dir, write the index directory atomically (the Prefect stage,
               tasks/stages.py CLIP_INDEX, names the folder by the prep dir's and checkpoint's content)
    search.py  verify_index, load_index, search_vector / search_text / search_image, format_hits
"""

from tasks.index.ann import MIN_POINTS_PER_CENTROID, IndexConfig, build_faiss, recall_at_k
from tasks.index.build import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    PROVENANCE_FILE,
    ROWS_FILE,
    build_index,
)
from tasks.index.embed import embed_images, embed_texts
from tasks.index.search import (
    REBUILD,
    Hit,
    IndexIntegrityError,
    IndexNotFoundError,
    LoadedIndex,
    format_hits,
    load_index,
    search_image,
    search_text,
    search_vector,
    verify_index,
)

__all__ = [
    "EMBEDDINGS_FILE", "INDEX_FILE", "MIN_POINTS_PER_CENTROID", "PROVENANCE_FILE", "REBUILD", "ROWS_FILE", "Hit",
    "IndexConfig", "IndexIntegrityError", "IndexNotFoundError", "LoadedIndex", "build_faiss", "build_index",
    "embed_images", "embed_texts", "format_hits", "load_index", "recall_at_k",
    "search_image", "search_text", "search_vector", "verify_index",
]
