"""Near-duplicate removal with MinHash-LSH: datatrove's decisions, computed about an order of magnitude faster.

datatrove's 4-stage MinHash (signature → buckets → cluster → filter) spends ~98% of its time in the signature stage
(FACTS.md), nearly all of it in spaCy's word tokenizer. This module keeps datatrove's math exactly — the same text
simplification, the same words, the same xxh64 shingle hashes, the same `(a*h + b) mod (2^61 - 1)` permutations
drawn from the same seed — so a signature here equals datatrove's for the same text. What changes is how it is
computed:
- words: the simplified text is split on spaces; only the few distinct chunks spaCy could split further (contractions
  such as "dont", digits glued to letters, symbols) go through spaCy, once each, and are cached;
- permutations: one numpy broadcast per batch of documents, with `mod p` done by Mersenne folding;
- LSH: per band, a sort groups equal bands; union-find over all shards' documents runs as vectorised label
  propagation. The smallest key of each cluster is kept, so the result does not depend on how documents were
  split into shards.

`MinhashSignatureStep` is the datatrove pipeline step that replaces `MinhashDedupSignature`; `load_signatures` plus
`find_duplicates` replace the buckets and cluster stages.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.text import NUMBERS_PATTERN, PUNCTUATION
from datatrove.utils.word_tokenizers import load_word_tokenizer

MERSENNE_PRIME = np.uint64((1 << 61) - 1)   # datatrove's permutation modulus (minhash.py `_mersenne_prime`)
EMPTY = np.iinfo(np.uint64).max             # signature of a text with fewer than n_grams words: never a duplicate
ORDER_FIELD = "order"                       # doc.metadata key holding the global document key

# ASCII fast path of datatrove's simplify_text: the same punctuation table and number pattern, on bytes.
_ASCII_PUNCTUATION = bytes(ord(c) for c in PUNCTUATION if ord(c) < 128)
_ASCII_TRANS = bytes.maketrans(_ASCII_PUNCTUATION, b" " * len(_ASCII_PUNCTUATION))
_ASCII_NUMBERS = re.compile(rb"[0-9]+(?:[.,][0-9]+)?")   # NUMBERS_PATTERN restricted to ASCII digits/separators
# Non-ASCII text: one regex pass replaces str.translate(PUNCTUATION_TRANS), which costs a dict lookup per character.
_PUNCTUATION_CLASS = re.compile("[%s]" % re.escape(PUNCTUATION))
_PLAIN_WORD = re.compile(r"[a-z]+|0")   # chunks spaCy leaves whole unless they are a tokenizer special case


@dataclass(frozen=True)
class MinhashParams:
    """MinHash-LSH parameters. Defaults are datatrove's `MinhashConfig` (the FineWeb settings, FineWeb blog
    "Deduplication"): 5-word shingles, 14 bands of 8 hashes, seed 1, xxh64 shingle hashes at 64-bit precision.
    Two documents with Jaccard similarity 0.8 share a band with probability 1 - (1 - 0.8^8)^14 ≈ 0.92."""

    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1

    def __post_init__(self):
        for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MinhashParams.{name} must be an integer >= 1, got {value!r}")
        # numpy's RandomState (datatrove's parameter generator) accepts seeds in [0, 2**32).
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"MinhashParams.seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def num_hashes(self) -> int:
        return self.num_buckets * self.hashes_per_bucket

    def permutations(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b), each shape (num_hashes,): drawn exactly as datatrove's `MinhashDedupSignature.parameters`."""
        gen = np.random.RandomState(self.seed)
        a = gen.randint(1, MERSENNE_PRIME, dtype=np.uint64, size=(1, self.num_hashes))
        b = gen.randint(0, MERSENNE_PRIME, dtype=np.uint64, size=(1, self.num_hashes))
        return a[0], b[0]

    def to_datatrove(self):
        """The equivalent datatrove `MinhashConfig` (for running the stock stages side by side)."""
        from datatrove.pipeline.dedup.minhash import MinhashConfig

        return MinhashConfig(n_grams=self.n_grams, num_buckets=self.num_buckets,
                             hashes_per_bucket=self.hashes_per_bucket, seed=self.seed)


# ------------------------------------------------------------------------------------------------------- words --
def simplify_words(text: str) -> list[str]:
    """The whitespace-separated chunks of datatrove's `simplify_text(text)` (default TextNormConfig): lowercase,
    numbers → "0", punctuation → space, accents stripped. Pure-ASCII text takes a bytes path with the same result."""
    if text.isascii():
        raw = _ASCII_NUMBERS.sub(b"0", text.encode("ascii").lower()).translate(_ASCII_TRANS)
        return raw.decode("ascii").split()
    text = _PUNCTUATION_CLASS.sub(" ", NUMBERS_PATTERN.sub("0", text.lower()))
    text = unicodedata.normalize("NFD", " ".join(text.split()))
    marks = {c for c in set(text) if unicodedata.category(c) == "Mn"}
    if marks:   # removing a chunk's only characters leaves an empty chunk: split() drops it, as spaCy + strip does
        text = text.translate(dict.fromkeys(map(ord, marks)))
    return text.split()


class WordSplitter:
    """datatrove's word tokenizer (spaCy blank 'en', `load_word_tokenizer`) applied to simplified text, with each
    distinct chunk tokenized once.

    spaCy tokenizes every space-separated chunk on its own, so a chunk's tokens can be cached. Plain lowercase
    words that are not tokenizer special cases ("dont" → do, nt) and the number placeholder "0" stay whole and never
    reach spaCy; the other new chunks of a text go through spaCy in one call."""

    MAX_CACHED = 2_000_000   # distinct chunks remembered before the cache is reset (bounds memory on huge shards)

    def __init__(self):
        self._nlp = load_word_tokenizer("en").tokenizer   # the spaCy Language datatrove builds
        self._special = frozenset(self._nlp.tokenizer.rules)
        self._whole: set[str] = set()
        self._split: dict[str, list[str]] = {}

    def words(self, text: str) -> list[str]:
        chunks = simplify_words(text)
        distinct = set(chunks)
        unseen = distinct - self._whole
        if unseen:
            self._learn(unseen.difference(self._split))
        to_split = distinct.intersection(self._split)
        if not to_split:
            return chunks
        # Expand the few split chunks with one C-level regex pass instead of a Python loop over every word.
        split = self._split
        pattern = re.compile(r"(?<!\S)(?:%s)(?!\S)" % "|".join(map(re.escape, sorted(to_split, key=len, reverse=True))))
        return pattern.sub(lambda match: " ".join(split[match.group()]), " ".join(chunks)).split()

    def _learn(self, chunks: set[str]) -> None:
        if len(self._whole) + len(self._split) > self.MAX_CACHED:
            self._whole.clear()
            self._split.clear()
        plain = {chunk for chunk in chunks if _PLAIN_WORD.fullmatch(chunk) and chunk not in self._special}
        self._whole |= plain
        rest = sorted(chunks - plain)
        if not rest:
            return
        groups: list[list[str]] = [[]]
        with self._nlp.memory_zone():   # as datatrove: lexemes of one-off chunks are not kept in the vocab
            for token in self._nlp.tokenizer(" ".join(rest)):
                if token.text.strip():   # datatrove's strip_strings
                    groups[-1].append(token.text.strip())
                if token.whitespace_:
                    groups.append([])
        if len(groups) != len(rest):
            raise RuntimeError(f"spaCy split {len(rest)} chunks into {len(groups)} groups")
        for chunk, words in zip(rest, groups):
            if words == [chunk]:
                self._whole.add(chunk)
            else:
                self._split[chunk] = words


# -------------------------------------------------------------------------------------------------- signatures --
def shingle_hashes(words: Sequence[str], n_grams: int) -> np.ndarray:
    """xxh64 of each n-gram joined by spaces (datatrove's default `hash_fc`); empty when there are < n_grams words."""
    if len(words) < n_grams:
        return np.empty(0, dtype=np.uint64)
    grams = zip(*(words[i:] for i in range(n_grams)))
    return np.fromiter(map(xxhash.xxh64_intdigest, map(" ".join, grams)), dtype=np.uint64,
                       count=len(words) - n_grams + 1)


def _min_permuted(hashes: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray, scratch: np.ndarray,
                  firsts: np.ndarray) -> np.ndarray:
    """Per segment starting at `firsts`, the column-wise min of (hashes * a + b) mod p, with datatrove's wrapping
    uint64 arithmetic. `mod (2^61 - 1)` by folding — x = hi·2^61 + lo ≡ hi + lo, then min(x, x - p) subtracts p at
    most once (exact) — in preallocated buffers: allocating the temporaries cost more than the arithmetic."""
    x, y = out[:len(hashes)], scratch[:len(hashes)]
    np.multiply(hashes[:, None], a, out=x)
    np.add(x, b, out=x)
    np.right_shift(x, np.uint64(61), out=y)
    np.bitwise_and(x, MERSENNE_PRIME, out=x)
    np.add(x, y, out=x)
    np.subtract(x, MERSENNE_PRIME, out=y)
    np.minimum(x, y, out=x)
    return np.minimum.reduceat(x, firsts, axis=0)


def signatures(texts: Sequence[str], params: MinhashParams = MinhashParams(), *,
               splitter: WordSplitter | None = None, rows_per_chunk: int = 512) -> np.ndarray:
    """MinHash signatures, uint64 of shape (len(texts), num_buckets * hashes_per_bucket), equal to datatrove's
    `MinhashDedupSignature.get_signature` per text. A text with fewer than n_grams words gets a row of EMPTY."""
    splitter = splitter or WordSplitter()
    per_doc = [shingle_hashes(splitter.words(text), params.n_grams) for text in texts]
    sigs = np.full((len(texts), params.num_hashes), EMPTY, dtype=np.uint64)
    counts = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
    if not counts.sum():
        return sigs
    hashes = np.concatenate(per_doc)
    doc_of_row = np.repeat(np.arange(len(texts)), counts)
    a, b = params.permutations()
    # Slices of ~512 rows keep the (rows × num_hashes) buffers in cache; a document may span several slices.
    out = np.empty((rows_per_chunk, params.num_hashes), dtype=np.uint64)
    scratch = np.empty_like(out)
    for start in range(0, len(hashes), rows_per_chunk):
        docs = doc_of_row[start:start + rows_per_chunk]
        firsts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        partial = _min_permuted(hashes[start:start + rows_per_chunk], a, b, out, scratch, firsts)
        ids = docs[firsts]
        sigs[ids] = np.minimum(sigs[ids], partial)
    return sigs


# ------------------------------------------------------------------------------------------------------------ LSH --
def _band_edges(sigs: np.ndarray, params: MinhashParams) -> np.ndarray:
    """(2, E) row-index pairs of documents whose signatures agree on a whole band; consecutive in sorted order, which
    is enough for connectivity (datatrove's buckets stage pairs the same neighbours)."""
    edges = []
    for band in range(params.num_buckets):
        cols = sigs[:, band * params.hashes_per_bucket:(band + 1) * params.hashes_per_bucket]
        order = np.lexsort(cols.T[::-1])
        ranked = cols[order]
        same = np.all(ranked[1:] == ranked[:-1], axis=1)
        edges.append(np.stack([order[:-1][same], order[1:][same]]))
    return np.concatenate(edges, axis=1) if edges else np.empty((2, 0), dtype=np.int64)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label of each node = the smallest node index in its component (union-find, vectorised:
    hook every edge's larger root under its smaller root, then compress paths, until no edge spans two labels)."""
    labels = np.arange(n)
    u, v = edges
    while True:
        lu, lv = labels[u], labels[v]
        spanning = lu != lv
        if not spanning.any():
            return labels
        lu, lv = lu[spanning], lv[spanning]
        np.minimum.at(labels, np.maximum(lu, lv), np.minimum(lu, lv))
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


def cluster_keys(keys: np.ndarray, sigs: np.ndarray, params: MinhashParams = MinhashParams()) -> np.ndarray:
    """For each document, the smallest key of its cluster (int64): documents that share any band are one cluster,
    transitively, across all shards. A document without duplicates, or too short to shingle (EMPTY), gets its own
    key."""
    keys = np.asarray(keys, dtype=np.int64)
    if sigs.ndim != 2 or sigs.shape != (len(keys), params.num_hashes):
        raise ValueError(f"sigs must have shape (len(keys), {params.num_hashes}) = ({len(keys)}, {params.num_hashes}), "
                         f"got {sigs.shape}")
    if len(np.unique(keys)) != len(keys):
        raise ValueError("keys must be unique (each document's global order number)")
    usable = np.flatnonzero(sigs[:, 0] != EMPTY)
    by_key = usable[np.argsort(keys[usable], kind="stable")]   # index order = key order: root = smallest key
    labels = _components(len(by_key), _band_edges(sigs[by_key], params))
    smallest = keys.copy()
    smallest[by_key] = keys[by_key[labels]]
    return smallest


def find_duplicates(keys: np.ndarray, sigs: np.ndarray, params: MinhashParams = MinhashParams()) -> np.ndarray:
    """Keys of the documents to remove (sorted int64): every cluster member except the one with the smallest key.
    (datatrove's cluster stage keeps the root of a union-by-size forest instead, which depends on bucket order; in a
    cluster of two both keep the smaller key.)"""
    keys = np.asarray(keys, dtype=np.int64)
    return np.sort(keys[cluster_keys(keys, sigs, params) != keys])


# ---------------------------------------------------------------------------------------------- pipeline step --
class MinhashSignatureStep(PipelineStep):
    """datatrove step replacing `MinhashDedupSignature`: computes signatures in batches, passes every document on
    unchanged, and at the end writes `{output_dir}/{rank:05d}.npz` with `keys` (doc.metadata["order"]) and `sigs`."""

    type = "🫂 - DEDUP"
    name = "🎯 MinHash signatures (vectorised)"

    def __init__(self, output_dir: str | os.PathLike, params: MinhashParams = MinhashParams(), batch_size: int = 1000):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"MinhashSignatureStep.batch_size must be >= 1, got {batch_size!r}")
        self.output_dir = Path(output_dir)
        self.params = params
        self.batch_size = batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        splitter = WordSplitter()
        keys: list[int] = []
        sigs: list[np.ndarray] = []
        batch = []
        for doc in data:
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from self._sign(batch, keys, sigs, splitter)
                batch = []
        yield from self._sign(batch, keys, sigs, splitter)
        with self.track_time():
            self._write(rank, np.asarray(keys, dtype=np.int64),
                        np.concatenate(sigs) if sigs else np.empty((0, self.params.num_hashes), np.uint64))

    def _sign(self, batch, keys, sigs, splitter):
        with self.track_time(unit="batch"):
            for doc in batch:
                key = doc.metadata.get(ORDER_FIELD)
                if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                    raise ValueError(f"document {doc.id!r}: metadata[{ORDER_FIELD!r}] must be an int key, got {key!r}")
                keys.append(int(key))
            batch_sigs = signatures([doc.text for doc in batch], self.params, splitter=splitter)
            sigs.append(batch_sigs)
            self.stat_update("total", value=len(batch))
            self.stat_update("too_short", value=int((batch_sigs[:, 0] == EMPTY).sum()))
        yield from batch

    def _write(self, rank: int, keys: np.ndarray, sigs: np.ndarray) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / f"{rank:05d}.npz"
        partial = final.with_name(f"{final.stem}.partial.npz")   # written then renamed: a crash leaves no torn file
        np.savez(partial, keys=keys, sigs=sigs)
        os.replace(partial, final)


def load_signatures(paths: Iterable[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the (keys, sigs) of the given rank files, in the order given (find_duplicates does not care)."""
    keys, sigs = [], []
    for path in paths:
        with np.load(path) as npz:
            if "keys" not in npz or "sigs" not in npz:
                raise ValueError(f"{path}: expected arrays 'keys' and 'sigs', found {sorted(npz.files)}")
            keys.append(npz["keys"])
            sigs.append(npz["sigs"])
    if not keys:
        raise ValueError("load_signatures: no signature files given")
    return np.concatenate(keys).astype(np.int64), np.concatenate(sigs)
