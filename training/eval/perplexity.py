"""Held-out perplexity: exp of the token-weighted mean negative log-likelihood.

Held-out sets (see `training.eval.heldout`): the standard library's module docstrings (prose) and its source files
(code), drawn with a seed. Each document is tokenized, followed by the end-of-sentence token as in pretraining, and
the documents are concatenated and cut into windows of `seq_length + 1` tokens; each window scores its last
`seq_length` tokens given the ones before. Every token is weighted equally across windows and documents (the mean
is over tokens, not over windows), so the number does not depend on how the text was batched.

By position (`PositionBuckets`): the same NLL split by where in its window each prediction is made, so that a context
extension's effect shows beyond the original length (DeepSeek-V3 §4.3, V2 §3.1.4 extend 4K to 128K with YaRN). The
position of a prediction is that of its last context token, 0-based: with windows of L + 1 tokens, positions 0..L-1;
a model pretrained on 64 tokens has never predicted from position 64 or later.
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


def bucket_edges(seq_length: int, edges: Sequence[int] | str) -> list[int]:
    """Bucket edges over positions 0..seq_length-1: "quarters" is [0, L/4, L/2, L] (for a 4x extension: inside the
    original context, then two buckets beyond it); a list is taken as given, closed by seq_length if it stops short."""
    if edges == "quarters":
        edges = [0, seq_length // 4, seq_length // 2]
    if isinstance(edges, str):
        raise ValueError(f"unknown position buckets {edges!r}")
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0 or edges != sorted(set(edges)) or edges[-1] > seq_length:
        raise ValueError(f"position buckets must rise strictly from 0 to at most seq_length {seq_length}, "
                         f"got {edges}")
    return edges if edges[-1] == seq_length else edges + [seq_length]


def bucket_name(start: int, end: int) -> str:
    return f"pos_{start}_{end}"


@dataclass
class PositionBuckets:
    """Token-weighted NLL per bucket of prediction positions [edges[i], edges[i+1])."""

    edges: list[int]

    def __post_init__(self):
        self.buckets = [NllAccumulator() for _ in self.edges[:-1]]

    def add(self, nll: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """`nll` [batch, positions]: column p is the prediction made at position p (see the module docstring)."""
        for acc, start, end in zip(self.buckets, self.edges, self.edges[1:]):
            if start < nll.shape[1]:
                acc.add(nll[:, start:end], None if mask is None else mask[:, start:end])

    def named(self) -> dict[str, NllAccumulator]:
        return {bucket_name(s, e): acc for acc, s, e in zip(self.buckets, self.edges, self.edges[1:])}

    def merge(self, other: "PositionBuckets") -> None:
        """Add another source's sums (same edges): buckets pooled over sources stay token-weighted."""
        if other.edges != self.edges:
            raise ValueError(f"cannot merge buckets {other.edges} into {self.edges}")
        for mine, theirs in zip(self.buckets, other.buckets):
            mine.nll_sum += theirs.nll_sum
            mine.tokens += theirs.tokens

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """`<prefix>pos_<a>_<b>` (perplexity), `..._nll` (mean NLL, nats) and `..._tokens`, per bucket; an empty
        bucket (windows shorter than its start) gives NaN perplexity and 0 tokens."""
        out: dict[str, float] = {}
        for name, acc in self.named().items():
            out.update({f"{prefix}{name}": acc.perplexity, f"{prefix}{name}_nll": acc.mean_nll,
                        f"{prefix}{name}_tokens": float(acc.tokens)})
        return out


def evaluate(score_window: Callable[[torch.Tensor], torch.Tensor], token_windows: Sequence[Sequence[int]],
             batch_size: int = 4, pad_id: int = 0, positions: PositionBuckets | None = None) -> NllAccumulator:
    """Token-weighted NLL over windows. `score_window(tokens [b, s])` returns the NLL [b, s-1] of tokens[:, 1:].
    `positions`, if given, also receives every window's NLL by prediction position."""
    acc = NllAccumulator()
    for start in range(0, len(token_windows), batch_size):
        batch = token_windows[start:start + batch_size]
        width = max(len(w) for w in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.float64)
        for row, w in enumerate(batch):   # right padding: causal attention keeps it out of the real positions
            tokens[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w) - 1] = 1.0
        nll = score_window(tokens)
        acc.add(nll, mask)
        if positions is not None:
            positions.add(nll, mask)
    return acc
