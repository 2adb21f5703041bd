"""Vectorised MinHash-LSH (training/data/curate/minhash.py) against datatrove's stock MinHash, on real text that ships
on this machine: same signatures, same clusters, planted-duplicate recall, shard independence, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from benchmarks.minhash_vs_datatrove import (build_corpus, jaccard, plant_duplicates, planted_recall, run_datatrove,
                                             run_ours, shingle_set)
from training.data.curate.minhash import (EMPTY, MinhashParams, MinhashSignatureStep, WordSplitter, find_duplicates,
                                          load_signatures, signatures)

PARAMS = MinhashParams()
# Text where spaCy splits chunks further, plus accents, non-Latin scripts and symbols (FACTS: real READMEs have all).
TRICKY = [
    "I'd say we cannot go; I'm sure they're right, dont you think? It's 10km away, 1st and 2nd of 3,5 items.",
    "Naïve café résumé — Ångström, Straße, ĳssel; 東京は大きい都市です。 Привет, мир! 👩‍💻 ships 💙💚 today ©2024.",
    "├── src\n│   └── main.py ─── 0t l0t 10mb 5gb python3t\n╭────────╮ «quoted» ‘this’ wasn't gonna whats up",
    "short text",   # fewer than 5 words: no shingles, never a duplicate (datatrove skips it too)
]


@pytest.fixture(scope="module")
def readmes() -> list[str]:
    return [text[:4000] for text in build_corpus(3_000_000)]   # ~280 READMEs (then source files), cut short


@pytest.fixture(scope="module")
def planted(readmes):
    return plant_duplicates(readmes, n_near=60, n_exact=20, seed=7)


def datatrove_signature(step: MinhashDedupSignature, text: str) -> np.ndarray:
    shingles = step.get_shingles(text)
    if not shingles.size:
        return np.full(PARAMS.num_hashes, EMPTY, dtype=np.uint64)
    return np.concatenate([np.asarray(band, dtype=np.uint64) for band in step.get_signature(shingles)])


def test_signatures_and_removals_match_datatrove(readmes, tmp_path):
    small = plant_duplicates([text[:1500] for text in readmes[:40]] + TRICKY, n_near=10, n_exact=5, seed=3)
    texts = small.texts

    ours = signatures(texts, PARAMS)
    step = MinhashDedupSignature(str(tmp_path / "unused"), config=PARAMS.to_datatrove())
    theirs = np.stack([datatrove_signature(step, text) for text in texts])
    assert ours.dtype == np.uint64 and ours.shape == (len(texts), PARAMS.num_hashes)
    differing = [i for i in range(len(texts)) if not np.array_equal(ours[i], theirs[i])]
    assert differing == [], f"signatures differ from datatrove for {[texts[i][:60] for i in differing]}"
    assert (ours[:, 0] == EMPTY).sum() >= 1   # the short text

    removed_by_datatrove, their_clusters = run_datatrove(texts, PARAMS, tmp_path)
    removed_by_us, our_clusters = run_ours(texts, PARAMS)
    assert len(removed_by_datatrove) >= len(small.near) + len(small.exact) - 2   # the comparison is not vacuous

    # Same clusters, same number removed. Which member a cluster keeps may differ: we keep the smallest key (so the
    # result is independent of sharding), datatrove the root of its union-by-size forest, which depends on bucket
    # order; in a cluster of two both keep the smaller key, so there the removed documents are the same.
    assert our_clusters == their_clusters
    assert len(removed_by_us) == len(removed_by_datatrove)
    in_pairs = set().union(*(cluster for cluster in our_clusters if len(cluster) == 2))
    assert removed_by_us & in_pairs == removed_by_datatrove & in_pairs
    assert removed_by_us == {doc for cluster in our_clusters for doc in cluster if doc != min(cluster)}


def test_find_duplicates_clusters_transitively_and_keeps_smallest_key():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**60, size=(6, PARAMS.num_hashes), dtype=np.uint64)
    band = PARAMS.hashes_per_bucket
    sigs[1, :band] = sigs[0, :band]                       # rows 0-1 share band 0
    sigs[2, 5 * band:6 * band] = sigs[1, 5 * band:6 * band]   # rows 1-2 share band 5: 0, 1, 2 are one cluster
    sigs[4] = EMPTY                                       # too short to shingle
    sigs[5] = EMPTY
    keys = np.array([50, 30, 90, 10, 70, 60])
    assert find_duplicates(keys, sigs, PARAMS).tolist() == [50, 90]   # 30 is the smallest key of {50, 30, 90}
    order = rng.permutation(6)
    assert find_duplicates(keys[order], sigs[order], PARAMS).tolist() == [50, 90]


def test_planted_duplicates_are_found_and_unrelated_documents_kept(planted):
    keys = np.arange(len(planted.texts))
    removed = set(find_duplicates(keys, signatures(planted.texts, PARAMS), PARAMS).tolist())

    assert min(planted.near_jaccard) >= 0.8
    assert planted_recall(removed, planted.near) >= 0.95
    assert planted_recall(removed, planted.exact) == 1.0

    # Unrelated: not planted, not an original, and no other document with 5-gram Jaccard >= 0.5 (package READMEs
    # contain real near-copies of each other; removing those is correct, not a false positive).
    involved = set(planted.near) | set(planted.near.values()) | set(planted.exact) | set(planted.exact.values())
    splitter = WordSplitter()
    shingles = [shingle_set(splitter.words(text)) for text in planted.texts]
    unrelated = [i for i in keys.tolist() if i not in involved]
    false_positives = [i for i in unrelated if i in removed
                       and max(jaccard(shingles[i], shingles[j]) for j in keys.tolist() if j != i) < 0.5]
    assert len(unrelated) >= 100
    assert len(false_positives) / len(unrelated) < 0.01


def run_step(texts: list[str], out_dir, world_size: int) -> list[Document]:
    """The signature step per rank, rank r holding documents r, r + world_size, ... (keys are global)."""
    passed = []
    for rank in range(world_size):
        docs = [Document(text=texts[i], id=str(i), metadata={"order": i}) for i in range(rank, len(texts), world_size)]
        step = MinhashSignatureStep(out_dir, PARAMS, batch_size=64)
        passed += list(step.run(iter(docs), rank=rank, world_size=world_size))
    return passed


def test_removed_set_does_not_depend_on_sharding(planted, tmp_path):
    texts = planted.texts
    one = run_step(texts, tmp_path / "one", world_size=1)
    assert [(d.id, d.text) for d in one] == [(str(i), t) for i, t in enumerate(texts)]   # passed on unchanged
    run_step(texts, tmp_path / "three", world_size=3)

    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == ["00000.npz", "00001.npz", "00002.npz"]
    removed_one = find_duplicates(*load_signatures(sorted((tmp_path / "one").glob("*.npz"))), PARAMS)
    keys, sigs = load_signatures(sorted((tmp_path / "three").glob("*.npz"), reverse=True))
    removed_three = find_duplicates(keys, sigs, PARAMS)
    assert len(removed_one) >= len(planted.near)
    assert removed_three.tolist() == removed_one.tolist()


@pytest.mark.parametrize("field, value", [("n_grams", 0), ("num_buckets", -1), ("hashes_per_bucket", 2.5),
                                          ("seed", -1), ("seed", 2**32)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MinhashParams\.{field}"):
        MinhashParams(**{field: value})


def test_step_requires_an_integer_order_key(tmp_path):
    docs = [Document(text="one two three four five six", id="doc-a", metadata={"order": "7"})]
    with pytest.raises(ValueError, match=r"doc-a.*metadata\['order'\]"):
        list(MinhashSignatureStep(tmp_path, PARAMS).run(iter(docs)))


def test_find_duplicates_rejects_mismatched_shapes_and_repeated_keys():
    sigs = np.zeros((2, PARAMS.num_hashes), dtype=np.uint64)
    with pytest.raises(ValueError, match="sigs must have shape"):
        find_duplicates(np.arange(3), sigs, PARAMS)
    with pytest.raises(ValueError, match="keys must be unique"):
        find_duplicates(np.array([1, 1]), sigs, PARAMS)
