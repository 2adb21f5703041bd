"""A synthetic curate output: patterned token streams in a megatron indexed dataset, plus its manifest.

For tests and benchmarks that need the pretrain stage without the cost of the real curate stage and the 129K
vocabulary: each document repeats a random 16-token pattern 8 times, so a model can learn it quickly.
"""
from __future__ import annotations

import json
from pathlib import Path


def write_synthetic_curate(run_root: str | Path, *, vocab_size: int = 512, documents: int = 200,
                           seed: int = 0, vocab_merges: int | None = None) -> dict:
    """Write `{run_root}/curate/data/synthetic_text_document.{bin,idx}` and `curate/manifest.json`: token ids below
    `vocab_size`, or, with `vocab_merges`, ids of that vocabulary subset (training/vocabulary.py)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    data = Path(run_root) / "curate" / "data"
    data.mkdir(parents=True)
    prefix = str(data / "synthetic_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    rng = np.random.default_rng(seed)
    pool = np.arange(2, vocab_size)
    if vocab_merges is not None:
        from training.tokenizer import bpe_subset_ids

        pool = np.asarray(bpe_subset_ids(vocab_merges))
    for _ in range(documents):
        doc = np.tile(rng.choice(pool, size=16), 8)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    manifest = {"stage": "curate", "config_hash": "synthetic", "inputs": {}, "metrics": {},
                "outputs": {"datasets": [{"prefix": prefix, "weight": 1.0}],
                            "tokenizer": {"vocab_size": vocab_size, "eod_id": 1, "vocab_merges": vocab_merges}}}
    (Path(run_root) / "curate" / "manifest.json").write_text(json.dumps(manifest))
    return manifest
