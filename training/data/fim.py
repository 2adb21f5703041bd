"""Fill-in-the-middle (FIM) training documents: which documents, which mode, where the middle is, and their tokens.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle", arXiv:2207.14255) cut a
document into prefix, middle and suffix and move the middle to the end behind sentinel tokens, so a left-to-right
model learns to infill. The format (PSM, SPM, the sentinels, EOD) is `training.tokenizer`'s, the one definition that
evaluation's FIM prompts use too.

Where it runs, and why: at packing time, during curation, once per document (`PackCandidates` calls
`document_ids`). DeepSeek-V3 §4.1 applies FIM "at the document level as a part of the pre-packing process" and
DeepSeek-Coder §3.1 likewise trains with document-level FIM. A sample-time transform on packed sequences would cut
documents across samples (a prefix in one sample, its middle in the next) and re-tokenise text every step. So the FIM
rate is a property of the curated corpus, set on the curate source (`CurateSource.fim`).

Each decision comes from sha256(seed, document id) alone, never from a global RNG, so one shard or three, in any
order, produce the same bytes:
  - u₁ < rate transforms the document; u₂ < spm_rate makes it SPM, otherwise PSM;
  - two positions drawn uniformly over the character positions 0..len(text), then sorted, give
    prefix = text[:i], middle = text[i:j], suffix = text[j:]. Any part may be empty. This is Bavarian et al.'s
    character-level split, the one they recommend, and Megatron-LM's FIM dataset draws the same way. Python indices
    are code points, so a multi-byte UTF-8 character is never cut.
Special-token text inside a document (the repository and file markers of a `repos` sample) is never cut: positions
strictly inside a marker are not drawn. Prefix, middle and suffix are encoded separately (as Bavarian et al. and
Megatron-LM do), so every sentinel falls on a token boundary.

A FIM document longer than the training sequence is still cut across samples by megatron's GPT dataset, like any
other long document.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training import tokenizer as T

NONE = "none"                       # a document left as it is (plain tokens, then EOD)
MODES = (T.PSM, T.SPM, NONE)        # what `FimPlan.mode` can be; the curate manifest counts documents per mode
_SPECIAL = re.compile("|".join(re.escape(t) for t in T.SPECIAL_TOKENS))
_UNIT = 2.0 ** -53


@dataclass(frozen=True)
class FimPlan:
    """What happens to one document: `mode` and the middle's character span text[start:end]."""

    mode: str = NONE
    start: int = 0
    end: int = 0

    def split(self, text: str) -> tuple[str, str, str]:
        """(prefix, middle, suffix)."""
        return text[:self.start], text[self.start:self.end], text[self.end:]


@dataclass(frozen=True)
class FimDocument:
    """The tokens to pack for a document (EOD last) and the plan that made them."""

    ids: list[int]
    plan: FimPlan

    @property
    def mode(self) -> str:
        return self.plan.mode


def _words(seed: int, doc_id: str) -> list[int]:
    """Four independent 64-bit words from the document's hash: the FIM coin, the SPM coin, two split points."""
    digest = hashlib.sha256(f"seekflow-fim\0{seed}\0{doc_id}".encode()).digest()
    return [int.from_bytes(digest[k:k + 8], "little") for k in range(0, 32, 8)]


def _protected(text: str) -> list[tuple[int, int]]:
    """Half-open ranges of positions strictly inside special-token text, which a split must not cut."""
    if "<" not in text:   # every special token starts with "<": the common case costs one scan
        return []
    return [(m.start() + 1, m.end()) for m in _SPECIAL.finditer(text)]


def _position(k: int, holes: list[tuple[int, int]]) -> int:
    """The k-th allowed position of 0..len(text), skipping the sorted, disjoint `holes`."""
    for start, end in holes:
        if k < start:
            break
        k += end - start
    return k


def plan(text: str, doc_id: str, *, seed: int = 0, rate: float = 0.0, spm_rate: float = 0.0) -> FimPlan:
    """The FIM decision for one document, a pure function of (seed, doc_id, rate, spm_rate) and the text's length
    (and special-token positions). Raising `rate` only adds documents: u₁ does not depend on it."""
    if not 0.0 <= rate <= 1.0 or not 0.0 <= spm_rate <= 1.0:
        raise ValueError(f"rate and spm_rate must lie in [0, 1], got rate={rate}, spm_rate={spm_rate}")
    if rate <= 0.0:
        return FimPlan()
    fim_word, spm_word, first, second = _words(seed, doc_id)
    if (fim_word >> 11) * _UNIT >= rate:   # 53 random bits → a uniform float in [0, 1), exact
        return FimPlan()
    mode = T.SPM if (spm_word >> 11) * _UNIT < spm_rate else T.PSM
    holes = _protected(text)
    allowed = len(text) + 1 - sum(end - start for start, end in holes)
    # 64-bit words modulo a count below 2**32: the bias is under 2**-32, far below any measurable effect.
    start, end = sorted((_position(first % allowed, holes), _position(second % allowed, holes)))
    return FimPlan(mode, start, end)


@functools.lru_cache(maxsize=4)
def _tokenizer_encode_batch(merges: int | None) -> Callable[[list[str]], list]:
    tok = T.load_tokenizer(merges)
    return getattr(tok, "encode_batch_fast", tok.encode_batch)   # no offsets: faster where available


def encode_pieces(texts: list[str], merges: int | None = None) -> list[list[int]]:
    """Token ids of each text, encoded on its own, with no special tokens added (DeepSeek's tokenizer adds none),
    by the full tokenizer or its first `merges` merges (a model's vocab_merges: training/vocabulary.py)."""
    return [e.ids for e in _tokenizer_encode_batch(merges)(texts, add_special_tokens=False)]


def apply_plan(text: str, decision: FimPlan, *, plain_ids: Sequence[int] | None = None,
               encode: Callable[[list[str]], list[list[int]]] = encode_pieces) -> list[int]:
    """The tokens `decision` makes of `text`, EOD last: `training.tokenizer.fim_document_ids` of the three parts,
    or the plain tokens (`plain_ids` when the caller has encoded the text already)."""
    if decision.mode == NONE:
        ids = list(plain_ids) if plain_ids is not None else encode([text])[0]
        return [*ids, T.eod_id()]
    prefix, middle, suffix = encode(list(decision.split(text)))
    return T.fim_document_ids(prefix, middle, suffix, decision.mode)


def document_ids(text: str, doc_id: str, *, seed: int = 0, rate: float = 0.0, spm_rate: float = 0.0,
                 plain_ids: Sequence[int] | None = None,
                 encode: Callable[[list[str]], list[list[int]]] = encode_pieces) -> FimDocument:
    """The tokens to pack for one document: a FIM document for the share `rate` of documents, otherwise the plain
    tokens; EOD ends both. The packer's one call per document (`plain_ids`: its batch encoding of the text, reused
    on the plain path)."""
    decision = plan(text, doc_id, seed=seed, rate=rate, spm_rate=spm_rate)
    return FimDocument(apply_plan(text, decision, plain_ids=plain_ids, encode=encode), decision)
