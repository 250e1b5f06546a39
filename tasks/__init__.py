"""The pipeline's work, in packages that read as its DAG, lowest first; a package imports only those above it here:

    infra/    storage (paths or fsspec URLs), content digests, atomic folders and output locks, the cache policy,
              MLflow tracking, checkpoints, hardware (device, precision, peak FLOP/s), procs (owners, watchdog)
    data/     builtin/ (the built-in set and its vocabulary) -> ingest/ (what may be read, decoding) -> shards -> features + preprocess
              -> loader (model-ready shards to batches) -> codebook (VQ codebooks on the patch samples)
    train/    table (the one model table) -> batches (collation) + augment -> trainer
    eval/     metrics, colour (pure) -> report (tables, plots) -> evaluate -> audio_out -> roundtrip
    index/    the CLIP index: embed, build, search
    stages    the Prefect tasks, one per stage; flows/ composes them

tests/test_structure.py holds the order: a lower package that imports a higher one fails it.
"""
