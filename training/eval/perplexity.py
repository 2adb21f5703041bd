"""Held-out perplexity: exp of the token-weighted mean negative log-likelihood.

Held-out sets (see `training.eval.heldout`): the standard library's module docstrings (prose) and its source files
(code), drawn with a seed. Each document is tokenized, followed by the end-of-sentence token as in pretraining, and
the documents are concatenated and cut into windows of `seq_length + 1` tokens; each window scores its last
`seq_length` tokens given the ones before. Every token is weighted equally across windows and documents (the mean
is over tokens, not over windows), so the number does not depend on how the text was batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@dataclass
class NllAccumulator:
    """Running sum of NLL (in nats) and token count; perplexity = exp(sum / count)."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, nll: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        nll = nll.double()
        if mask is not None:
            nll = nll * mask
            self.tokens += int(mask.sum())
        else:
            self.tokens += nll.numel()
        self.nll_sum += float(nll.sum())

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else math.nan


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of `targets` [...] under `logits` [..., vocab]. fp32 cross-entropy (fused log-sum-exp; float64
    over a 129K vocabulary is ~10x slower on CPU), returned as float64 so that long sums stay exact."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return flat.view(targets.shape).double()


def windows(token_streams: Iterable[Sequence[int]], seq_length: int, max_tokens: int | None = None,
            eod_id: int | None = None) -> list[list[int]]:
    """Concatenate documents (each followed by `eod_id`) and cut into windows of seq_length + 1 tokens.

    Consecutive windows overlap by one token (the last target of one is the first input of the next), so every
    token after the very first is scored exactly once. A final short window is kept if it scores anything."""
    stream: list[int] = []
    for tokens in token_streams:
        stream.extend(tokens)
        if eod_id is not None:
            stream.append(eod_id)
        if max_tokens is not None and len(stream) > max_tokens:
            stream = stream[:max_tokens + 1]
            break
    return [stream[i:i + seq_length + 1] for i in range(0, max(len(stream) - 1, 0), seq_length)]


def evaluate(score_window: Callable[[torch.Tensor], torch.Tensor], token_windows: Sequence[Sequence[int]],
             batch_size: int = 4, pad_id: int = 0) -> NllAccumulator:
    """Token-weighted NLL over windows. `score_window(tokens [b, s])` returns the NLL [b, s-1] of tokens[:, 1:]."""
    acc = NllAccumulator()
    for start in range(0, len(token_windows), batch_size):
        batch = token_windows[start:start + batch_size]
        width = max(len(w) for w in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.float64)
        for row, w in enumerate(batch):   # right padding: causal attention keeps it out of the real positions
            tokens[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w) - 1] = 1.0
        acc.add(score_window(tokens), mask)
    return acc
