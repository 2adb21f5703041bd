"""Near-dedup throughput and recall: our vectorised MinHash-LSH vs datatrove's stock 4-stage MinHash, same corpus,
same process, same parameters (datatrove defaults = FineWeb).

    .venv/bin/python benchmarks/minhash_vs_datatrove.py [--mb 8] [--planted 200]

The corpus is real text that ships on this machine (installed packages' README bodies, then their source files) with
planted duplicates: exact copies and near-copies (a few word edits, Jaccard ≥ 0.8 on 5-word shingles). Both sides
must remove the same planted documents; the script prints docs/s, MB/s, the speed ratio and planted recall.
`build_corpus` and `plant_duplicates` are reusable (benchmarks/curation.py imports them).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.data.curate.minhash import MinhashParams, WordSplitter, cluster_keys, find_duplicates, signatures
from training.data.sample_corpus import Document, installed_packages, package_code, package_metadata


def build_corpus(max_bytes: int, *, min_chars: int = 200, max_file_bytes: int = 200_000) -> list[str]:
    """Real texts up to `max_bytes` UTF-8 bytes: README bodies of installed packages first, then their source files."""
    packages = installed_packages()
    texts, total = [], 0
    for item in itertools.chain(package_metadata(packages), package_code(packages, max_file_bytes)):
        if not isinstance(item, Document) or len(item.text) < min_chars:
            continue
        texts.append(item.text)
        total += len(item.text.encode())
        if total >= max_bytes:
            break
    return texts


def shingle_set(words: list[str], n_grams: int = 5) -> set[tuple[str, ...]]:
    return set(zip(*(words[i:] for i in range(n_grams))))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class PlantedCorpus:
    """Texts plus which of them were planted: `near`/`exact` map a planted index to its original's index."""

    texts: list[str]
    near: dict[int, int] = field(default_factory=dict)
    exact: dict[int, int] = field(default_factory=dict)
    near_jaccard: list[float] = field(default_factory=list)


def near_copy(words: list[str], rng: random.Random, edits: int) -> list[str]:
    """`words` with `edits` random single-word substitutions, deletions or insertions."""
    out = list(words)
    for _ in range(edits):
        i = rng.randrange(len(out))
        kind = rng.choice(("substitute", "delete", "insert"))
        if kind == "substitute":
            out[i] = f"edit{rng.randrange(10**6)}"
        elif kind == "delete" and len(out) > 1:
            del out[i]
        else:
            out.insert(i, f"added{rng.randrange(10**6)}")
    return out


def plant_duplicates(originals: list[str], n_near: int, n_exact: int, *, seed: int = 0, min_jaccard: float = 0.8,
                     min_words: int = 60) -> PlantedCorpus:
    """Append near-copies and exact copies of randomly chosen originals (with >= min_words words), then shuffle.

    A near-copy is built from the original's simplified words (what MinHash sees) with one edit per ~100 words,
    and is kept only if its 5-gram shingle Jaccard with the original is >= min_jaccard."""
    rng = random.Random(seed)
    splitter = WordSplitter()
    words = [splitter.words(text) for text in originals]
    eligible = [i for i, w in enumerate(words) if len(w) >= min_words]
    if not eligible:
        raise ValueError(f"plant_duplicates: no original has >= {min_words} words")
    texts = list(originals)
    near, exact, scores = {}, {}, []
    while len(near) < n_near:
        source = rng.choice(eligible)
        text = " ".join(near_copy(words[source], rng, edits=max(1, len(words[source]) // 100)))
        score = jaccard(shingle_set(words[source]), shingle_set(splitter.words(text)))
        if score >= min_jaccard:
            near[len(texts)] = source
            scores.append(score)
            texts.append(text)
    for _ in range(n_exact):
        source = rng.choice(eligible)
        exact[len(texts)] = source
        texts.append(originals[source])
    order = list(range(len(texts)))
    rng.shuffle(order)
    new_index = {old: new for new, old in enumerate(order)}
    return PlantedCorpus(texts=[texts[i] for i in order],
                         near={new_index[p]: new_index[o] for p, o in near.items()},
                         exact={new_index[p]: new_index[o] for p, o in exact.items()},
                         near_jaccard=scores)


def planted_recall(removed: set[int], planted: dict[int, int]) -> float:
    """Share of planted pairs (copy, original) of which at least one side was removed (exactly one must stay)."""
    hits = sum(1 for copy, original in planted.items() if copy in removed or original in removed)
    return hits / len(planted) if planted else 1.0


def clusters_of(label_of: dict[int, int]) -> set[frozenset[int]]:
    """The groups of >= 2 documents that share a label (document index → cluster label)."""
    groups: dict[int, set[int]] = {}
    for doc, label in label_of.items():
        groups.setdefault(label, set()).add(doc)
    return {frozenset(group) for group in groups.values() if len(group) > 1}


def run_ours(texts: list[str], params: MinhashParams) -> tuple[set[int], set[frozenset[int]]]:
    """(removed indexes, clusters) from our signatures + LSH, keys = indexes."""
    keys = np.arange(len(texts), dtype=np.int64)
    sigs = signatures(texts, params)
    removed = set(find_duplicates(keys, sigs, params).tolist())
    return removed, clusters_of(dict(enumerate(cluster_keys(keys, sigs, params).tolist())))


def run_datatrove(texts: list[str], params: MinhashParams, workdir: Path) -> tuple[set[int], set[frozenset[int]]]:
    """(removed indexes, clusters) from the stock 4 stages run in-process (tasks=1, workers=1) under `workdir`."""
    from datatrove.data import Document as DtDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)

    config = params.to_datatrove()
    sigs, buckets, remove = (str(workdir / name) for name in ("sigs", "buckets", "remove"))   # datatrove wants str
    docs = [DtDocument(text=text, id=str(i)) for i, text in enumerate(texts)]
    kept: list[str] = []

    def collect(data, rank=0, world_size=1):
        for doc in data:
            kept.append(doc.id)
            yield doc

    stages = [
        ([docs, MinhashDedupSignature(sigs, config=config)], 1),
        ([MinhashDedupBuckets(sigs, buckets, config=config)], config.num_buckets),
        ([MinhashDedupCluster(buckets, remove, config=config, save_cluster_id=True)], 1),
        ([docs, MinhashDedupFilter(remove), collect], 1),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, skip_completed=False,
                              logging_dir=str(workdir / f"logs{i}")).run()
    removed = set(range(len(texts))) - {int(doc_id) for doc_id in kept}
    # The cluster stage's `{rank:06d}.clusters`: (doc index, cluster id) uint32 pairs for clustered documents.
    path = Path(remove) / "000000.clusters"
    pairs = np.fromfile(path, dtype="<u4").reshape(-1, 2) if path.exists() else np.empty((0, 2), np.uint32)
    return removed, clusters_of({int(doc): int(cluster) for doc, cluster in pairs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="real text to read, in MB (before planting)")
    parser.add_argument("--planted", type=int, default=200, help="near-duplicates to plant (plus half as many exact)")
    args = parser.parse_args()

    params = MinhashParams()
    corpus = plant_duplicates(build_corpus(int(args.mb * 1e6)), args.planted, args.planted // 2)
    n_docs, megabytes = len(corpus.texts), sum(len(t.encode()) for t in corpus.texts) / 1e6
    print(f"corpus: {n_docs} docs, {megabytes:.1f} MB; planted {len(corpus.near)} near "
          f"(Jaccard min {min(corpus.near_jaccard):.3f}, mean {np.mean(corpus.near_jaccard):.3f}), "
          f"{len(corpus.exact)} exact")

    # Wall and CPU time of this process (datatrove runs in-process): CPU time is the steadier number on a shared box.
    start, cpu = time.perf_counter(), time.process_time()
    ours, our_clusters = run_ours(corpus.texts, params)
    ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
    # datatrove logs every task and stage to stderr; only the summary below matters here.
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stderr(io.StringIO()):
        start, cpu = time.perf_counter(), time.process_time()
        theirs, their_clusters = run_datatrove(corpus.texts, params, Path(workdir))
        theirs_s, theirs_cpu = time.perf_counter() - start, time.process_time() - cpu

    for name, removed, seconds in (("datatrove 4-stage", theirs, theirs_s), ("ours", ours, ours_s)):
        print(f"{name:>18}: {n_docs / seconds:8.1f} docs/s {megabytes / seconds:6.2f} MB/s  removed {len(removed):5d}"
              f"  near recall {planted_recall(removed, corpus.near):.3f}"
              f"  exact recall {planted_recall(removed, corpus.exact):.3f}")
    print(f"speed ratio ours/datatrove: {theirs_s / ours_s:.1f}x wall, {theirs_cpu / ours_cpu:.1f}x CPU time")
    print(f"clusters equal: {our_clusters == their_clusters} "
          f"({len(our_clusters)});  removed sets equal: {ours == theirs} (only ours {len(ours - theirs)}, "
          f"only datatrove {len(theirs - ours)}: the kept member of a cluster of >2 can differ, see find_duplicates)")


if __name__ == "__main__":   # LocalPipelineExecutor may use forkserver: keep module import side-effect free
    main()
