"""A model's vocabulary: which of DeepSeek's token ids the model has embedding rows for, and in which row.

DeepSeek's full tokenizer gives 129,280 rows, one per id (rows are ids). That output head is about 99% of the tiny
model's compute on 2 CPU cores, so a small model can train on a smaller BPE instead: DeepSeek's own, cut to its first
N merges (`training.tokenizer.load_tokenizer(merges=N)`). Its tokens are a subset of DeepSeek's, with DeepSeek's ids,
so curated data, prompts and outputs stay in DeepSeek's id space and decode with the full tokenizer; only the model
sees rows. The rows are the subset's ids in ascending order, then the special tokens the platform writes (BOS, EOD,
FIM, chat...), which sit at ids of 128,000 and above. DeepSeek's other ~1,270 added tokens are reserved placeholders:
they get no row, and an input holding one is refused.

The mapping is a pure function of the tokenizer file and N, and N is recorded in the model's config
(`model.vocab_merges`), so a release carries its mapping. A leaf: imports only the tokenizer leaf.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from training import tokenizer as T


class VocabularyError(ValueError):
    """A token the model has no row for, or a model too small for its vocabulary: bad input, not retried."""

    permanent = True


class Vocabulary:
    """Ids <-> rows of one model vocabulary: the full tokenizer (identity) or its first `merges` BPE merges."""

    def __init__(self, merges: int | None = None):
        self.merges = merges
        self.tokenizer = T.load_tokenizer(merges)
        self.id_of_row: np.ndarray | None = None     # None: the identity (the full tokenizer)
        if merges is None:
            self.rows = T.VOCAB_SIZE_PADDED
            return
        kept = list(T.bpe_subset_ids(merges))
        special = sorted({T.token_id(t) for t in T.SPECIAL_TOKENS} - set(kept))
        self.id_of_row = np.asarray(kept + special, dtype=np.int64)
        self.rows = len(self.id_of_row)
        self._row_of_id = np.full(T.VOCAB_SIZE_PADDED, -1, dtype=np.int64)
        self._row_of_id[self.id_of_row] = np.arange(self.rows)
        self._row_table = torch.from_numpy(self._row_of_id)
        self._id_table = torch.from_numpy(self.id_of_row)

    @property
    def is_subset(self) -> bool:
        return self.id_of_row is not None

    def describe(self) -> str:
        if not self.is_subset:
            return f"{T.NAME} ({self.rows} rows)"
        return f"{T.NAME}, first {self.merges} BPE merges ({self.rows} rows)"

    def check_fits(self, vocab_size: int) -> None:
        """The model's `vocab_size` embedding rows must hold every row of this vocabulary."""
        if vocab_size < self.rows:
            raise VocabularyError(f"model.vocab_size ({vocab_size}) is smaller than the vocabulary's {self.rows} rows "
                                  f"({self.describe()})")

    def to_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of DeepSeek token ids (same shape); an id without a row is a VocabularyError naming it."""
        if not self.is_subset:
            return ids
        rows = self._row_table.to(ids.device)[ids]
        if bool((rows < 0).any()):
            bad = int(ids[rows < 0][0])
            raise VocabularyError(f"token id {bad} ({self.tokenizer.id_to_token(bad)!r}) is not in the model's "
                                  f"vocabulary ({self.describe()}): was the data tokenized with another vocabulary?")
        return rows

    def to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """DeepSeek token ids of embedding rows (the inverse of `to_rows`)."""
        if not self.is_subset:
            return rows
        return self._id_table.to(rows.device)[rows]

    def batch_to_rows(self, batch: dict) -> dict:
        """A training micro-batch with its `tokens` and `labels` in rows (other keys unchanged)."""
        if not self.is_subset:
            return batch
        return {key: self.to_rows(value) if key in ("tokens", "labels") else value for key, value in batch.items()}


@functools.lru_cache(maxsize=4)
def vocabulary(merges: int | None = None) -> Vocabulary:
    """The (cached) vocabulary of a model config's `vocab_merges`."""
    return Vocabulary(merges)


def manifest_entry(merges: int | None) -> dict:
    """What a curate manifest records of the vocabulary its datasets were tokenized with."""
    return {"name": T.NAME, "vocab_size": vocabulary(merges).rows, "eod_id": T.eod_id(), "vocab_merges": merges}


def check_data(recorded: dict, model, where: str = "model") -> None:
    """Curated data (its manifest's `outputs.tokenizer`) and a model (a ModelConfig) must share one vocabulary, and
    the model must have a row for every token; a VocabularyError names the field otherwise."""
    merges = recorded.get("vocab_merges")   # absent: curated before vocabulary subsets, with the full tokenizer
    if merges != model.vocab_merges:
        raise VocabularyError(f"{where}.vocab_merges ({model.vocab_merges}) differs from the curated data's "
                              f"({merges}): the data was tokenized with another vocabulary; curate it with "
                              f"vocab_merges {model.vocab_merges} or train with its vocabulary")
    if recorded["vocab_size"] > model.vocab_size:
        raise VocabularyError(f"{where}.vocab_size ({model.vocab_size}) is smaller than the tokenizer's "
                              f"({recorded['vocab_size']})")
