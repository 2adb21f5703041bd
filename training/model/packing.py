"""Packed samples kept apart in the model (DeepSeek-V3 §5.1: samples packed into one sequence "remain isolated and
mutually invisible"): attention stays within a sample, and each sample's rotary positions start at 0.

A packed batch marks its samples by `position_ids` restarting at 0 (training/data/sft_data.py). From them:
  - `sample_mask` builds the [b, 1, s, s] boolean mask (True: masked, megatron-core's convention) that allows a query
    only the keys of its own sample, causally; `CausalSdpaAttention` hands it to SDPA;
  - `packed_positions` makes those positions the ones rotary embeddings use. megatron-core's multi-latent attention
    computes its rotary table for positions 0..s-1 inside the layer (GPTModel's `position_ids` never reach it), so
    `use_sample_positions` wraps each MLA layer's rotary module of a built model: while `packed_positions` is
    active, the table it returns is gathered at the tokens' own positions ([s, b, 1, d] instead of [s, 1, 1, d]),
    which megatron's rotary application broadcasts over the heads. Outside it (pretraining, generation) the module
    returns what it always did.
The result: a sample's logits are those it gets alone (tests/training/model/test_packing.py). Context parallelism
splits a sequence by position, not by sample; packed batches refuse it.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

_POSITIONS: ContextVar[torch.Tensor | None] = ContextVar("seekflow_packed_positions", default=None)


def sample_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s], True where a query may NOT attend: another sample's key, or a later key of its own."""
    segment = (position_ids == 0).cumsum(dim=-1)                       # a new sample starts at position 0
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)              # [b, s, s]
    s = position_ids.size(-1)
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


@contextlib.contextmanager
def packed_positions(position_ids: torch.Tensor):
    """While active, rotary embeddings of models wrapped by `use_sample_positions` use `position_ids` [b, s]."""
    token = _POSITIONS.set(position_ids)
    try:
        yield
    finally:
        _POSITIONS.reset(token)


def use_sample_positions(gpt) -> None:
    """Wrap the rotary module of every multi-latent attention layer of `gpt` (decoder and MTP) as described above."""
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    for module in gpt.modules():
        if isinstance(module, MultiLatentAttention) and not hasattr(module.rotary_pos_emb, "_seekflow_packed"):
            rotary = module.rotary_pos_emb
            rotary.forward = _at_sample_positions(rotary.forward)
            rotary._seekflow_packed = True


def _at_sample_positions(table_of):
    def forward(max_seq_len, *args, **kwargs):
        out = table_of(max_seq_len, *args, **kwargs)
        positions = _POSITIONS.get()
        if positions is None:
            return out
        table, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)   # YaRN also returns mscale
        gathered = table[:, 0, 0, :][positions.t().to(table.device)].unsqueeze(2)    # [s, b, 1, d]
        return (gathered, *rest) if rest is not None else gathered
    return forward
