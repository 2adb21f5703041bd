"""The generated knowledge corpus (training/knowledge.py) as a curate output: its biographies tokenised into a
megatron indexed dataset with its manifest, which the code_cpt stage (with `kssm`, knowledge CPT) trains on, and its
held-out probes beside it (`curate/knowledge_probes.jsonl`), which the recall probe (training/eval/recall.py) asks.

The K-B spans the generator knows are written to the probes file's neighbour (`curate/knowledge_spans.jsonl`) for
scoring span detection only: training never reads them (KSSM finds its spans itself, without labels).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from training import knowledge


def write_knowledge_curate(run_root: str | Path, *, seed: int, people: int, copies: int = 4,
                           vocab_merges: int | None = None) -> dict:
    """Write `{run_root}/curate/`: the biographies of `people` fictional people (`copies` each) as
    `data/knowledge_text_document.{bin,idx}`, `knowledge_probes.jsonl`, `knowledge_spans.jsonl` and `manifest.json`;
    returns the manifest."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from training.tokenizer import eod_id
    from training.vocabulary import manifest_entry, vocabulary

    curate = Path(run_root) / "curate"
    (curate / "data").mkdir(parents=True)
    documents, probes = knowledge.corpus(seed, people, copies)
    vocab = vocabulary(vocab_merges)
    prefix = str(curate / "data" / "knowledge_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab.tokenizer.get_vocab_size()))
    tokens = 0
    for document in documents:
        ids = vocab.tokenizer.encode(document.text).ids + [eod_id()]
        builder.add_document(np.asarray(ids), [len(ids)])
        tokens += len(ids)
    builder.finalize(prefix + ".idx")
    (curate / "knowledge_probes.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in probes))
    (curate / "knowledge_spans.jsonl").write_text("".join(
        json.dumps({"text": d.text, "spans": d.spans}) + "\n" for d in documents))
    manifest = {"stage": "curate", "config_hash": f"knowledge-{seed}-{people}-{copies}", "inputs": {},
                "metrics": {"documents": len(documents), "tokens": tokens, "probes": len(probes)},
                "outputs": {"datasets": [{"prefix": prefix, "weight": 1.0, "name": "knowledge", "kind": "knowledge"}],
                            "tokenizer": manifest_entry(vocab_merges),
                            "probes": str(curate / "knowledge_probes.jsonl")}}
    (curate / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def read_probes(path: str | Path) -> list[knowledge.Probe]:
    return [knowledge.Probe(**json.loads(line)) for line in Path(path).read_text().splitlines() if line]
