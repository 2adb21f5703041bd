"""KSSM's attention objective (Wang et al.: language models attend less to knowledge-bearing tokens), adapted to a
causal MLA model: while `observe_salient_attention(kb, predicting_kb)` is active, every CausalSdpaAttention layer
also computes its attention probabilities (heads averaged) and the mass that each query about to predict a K-B
token puts on the K-B tokens before it. The objective is the mean of -log(that mass) over those queries and the
layers: recalling "Kesmora" after "Orvane Tellis was born in" should look at "Orvane Tellis".

The paper's masked-LM version raises the attention to K-B tokens from masked positions; a causal model has no mask
tokens, so the queries are the positions whose *next* token is K-B, and only earlier K-B keys count (causality).
MLA's queries and keys reach the core attention decompressed, with their rotary part, so the probabilities are the
ones the layer uses. It materialises [batch, heads, s, s] per layer, so it costs O(s²) memory while active; outside
the context nothing changes.
"""
from __future__ import annotations

import contextlib

import torch

EPSILON = 1e-6   # keeps log finite where a query gives the K-B tokens (almost) nothing
_ACTIVE: dict | None = None


@contextlib.contextmanager
def observe_salient_attention(kb: torch.Tensor, predicting_kb: torch.Tensor):
    """Within the block, attention layers record the objective; yields the list of per-layer terms. `kb` [b, s]:
    which input tokens are K-B; `predicting_kb` [b, s]: which positions' next token is."""
    global _ACTIVE
    terms: list[torch.Tensor] = []
    previous, _ACTIVE = _ACTIVE, {"kb": kb.bool(), "queries": predicting_kb.bool(), "terms": terms}
    try:
        yield terms
    finally:
        _ACTIVE = previous


def record(q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
    """Called by the core attention with its [b, heads, s, dim] queries and keys (causal, one sequence a row)."""
    if _ACTIVE is None or q.size(2) != k.size(2):   # inactive, or a KV-cache decode step
        return
    kb, queries = _ACTIVE["kb"].to(q.device), _ACTIVE["queries"].to(q.device)
    _ACTIVE["terms"].append(salient_attention_loss(q, k, scale, kb, queries))


def salient_attention_loss(q, k, scale: float, kb: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """-log of the causal attention mass (heads averaged) on earlier-or-same K-B keys, averaged over the `queries`
    positions that have at least one such key; 0 when none has."""
    s = q.size(2)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)   # [b, s, s]
    mass = (probs * kb[:, None, :].float()).sum(-1)                            # [b, s]
    has_kb_before = (kb.float().cumsum(-1) > 0) & queries
    if not bool(has_kb_before.any()):
        return scores.sum() * 0.0   # in the graph, zero
    return -torch.log(mass[has_kb_before] + EPSILON).mean()
