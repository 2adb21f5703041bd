"""SFT samples packed into fixed-length sequences, each sample kept apart (DeepSeek-V3 §5.1: "each single sequence is
packed from multiple samples ... a sample masking strategy ensures these examples remain isolated and mutually
invisible").

A conversation of n ids becomes one sample of n - 1 (token, label) pairs; samples are laid end to end, first fit in
a seeded order, and the sequence's tail is padding (its own segment, never learned). `position_ids` restart at 0 at
every sample: they mark where a sample begins, so attention (training/model/attention.py) keeps each sample to
itself and its rotary positions start at 0, exactly as if it were alone. The loss mask is the chat template's,
shifted with the labels: only assistant tokens and their closing end-of-sentence are learned.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


class PackedSamples:
    """An indexable dataset of packed sequences: {tokens, labels, loss_mask, position_ids}, each `seq_length` long,
    as megatron-core's GPTDataset yields them (what GPTTrainModule's micro-batches read)."""

    def __init__(self, conversations: Sequence[tuple[Sequence[int], Sequence[int]]], seq_length: int, pad_id: int,
                 seed: int = 0):
        order = list(range(len(conversations)))
        random.Random(f"seekflow-sft-pack/{seed}").shuffle(order)
        self.seq_length, self.pad_id = seq_length, pad_id
        self.bins: list[list[int]] = []        # conversation indices per sequence
        free: list[int] = []                   # tokens left in each bin
        for index in order:
            need = len(conversations[index][0]) - 1
            if need < 1 or need > seq_length:
                raise ValueError(f"conversation {index} has {need + 1} ids; a sample needs 2 to {seq_length + 1}")
            slot = next((b for b, room in enumerate(free) if room >= need), None)   # first fit
            if slot is None:
                self.bins.append([])
                free.append(seq_length)
                slot = len(self.bins) - 1
            self.bins[slot].append(index)
            free[slot] -= need
        self.samples = [self._pack([conversations[i] for i in members]) for members in self.bins]
        self.tokens = sum(len(c[0]) - 1 for c in conversations)

    def _pack(self, members) -> dict[str, np.ndarray]:
        tokens, labels, mask, positions = [], [], [], []
        for ids, loss_mask in members:
            tokens += ids[:-1]
            labels += ids[1:]
            mask += loss_mask[1:]
            positions += range(len(ids) - 1)
        pad = self.seq_length - len(tokens)
        return {"tokens": np.asarray(tokens + [self.pad_id] * pad, dtype=np.int64),
                "labels": np.asarray(labels + [self.pad_id] * pad, dtype=np.int64),
                "loss_mask": np.asarray(mask + [0] * pad, dtype=np.float32),
                "position_ids": np.asarray(positions + list(range(pad)), dtype=np.int64)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.samples[index]

    @property
    def fill(self) -> float:
        """Share of the packed positions that hold sample tokens (the rest is padding)."""
        return self.tokens / max(1, len(self.samples) * self.seq_length)


class ConversationRows:
    """One conversation per sequence, padded (the compress stage: CAP represents each input by itself), in a seeded
    order. Besides the next-token keys, each row carries its input's id (`example`, the conversation's index), its
    label (`label`, e.g. its task's index) and its real tokens (`valid`), the first two constant along the sequence.
    `by_id(i)` is conversation i's row."""

    extra_keys = ("example", "label", "valid")

    def __init__(self, conversations: Sequence[tuple[Sequence[int], Sequence[int]]], labels: Sequence[int],
                 seq_length: int, pad_id: int, seed: int = 0):
        self.seq_length, self.pad_id = seq_length, pad_id
        self.rows = [self._row(i, ids, mask, label)
                     for i, ((ids, mask), label) in enumerate(zip(conversations, labels, strict=True))]
        self.order = list(range(len(self.rows)))
        random.Random(f"seekflow-rows/{seed}").shuffle(self.order)

    def _row(self, index: int, ids: Sequence[int], loss_mask: Sequence[int], label: int) -> dict[str, np.ndarray]:
        n = len(ids) - 1
        if n < 1 or n > self.seq_length:
            raise ValueError(f"conversation {index} has {n + 1} ids; a row needs 2 to {self.seq_length + 1}")
        pad = self.seq_length - n
        return {"tokens": np.asarray(list(ids[:-1]) + [self.pad_id] * pad, dtype=np.int64),
                "labels": np.asarray(list(ids[1:]) + [self.pad_id] * pad, dtype=np.int64),
                "loss_mask": np.asarray(list(loss_mask[1:]) + [0] * pad, dtype=np.float32),
                "position_ids": np.arange(self.seq_length, dtype=np.int64),
                "example": np.full(self.seq_length, index, dtype=np.int64),
                "label": np.full(self.seq_length, label, dtype=np.int64),
                "valid": np.asarray([1.0] * n + [0.0] * pad, dtype=np.float32)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.rows[self.order[index]]

    def by_id(self, example: int) -> dict[str, np.ndarray]:
        return self.rows[example]
