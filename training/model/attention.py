"""Core attention for every layer: causal attention through torch's `scaled_dot_product_attention`, context-parallel
by all-gather.

megatron-core's local (non-Transformer-Engine) `DotProductAttention` materialises the [batch x heads, queries, keys]
scores and their softmax, and keeps the softmax for backward: O(sequence²) memory per layer (4.3 GB per micro-batch
for DeepSeek-V3's 128 heads at 4K tokens in bf16). SDPA picks a fused kernel (flash / memory-efficient on GPUs,
flash on CPUs) that keeps O(sequence); MLA's narrower values are zero-padded to the query head size so that flash
kernels apply. So `build_gpt` puts this module in every layer in place of megatron's.

Under context parallelism (CP) megatron-core splits each sequence over the CP ranks in 2 x CP chunks, rank r holding
chunks r and 2 x CP - 1 - r so that causal attention costs every rank the same (`get_batch_on_this_cp_rank`). It
already slices the rotary embedding, shifts MTP labels across ranks and reduces losses and gradients over CP; only the
attention itself, which needs every earlier key of the sequence, exists solely in Transformer Engine's ring attention.
Here each rank all-gathers the keys and values of its CP group (backward: reduce-scatter, so every key's gradient
sums the queries of all ranks), puts them in sequence order, and attends each of its two query chunks to the keys up
to the chunk's end, causally (no [queries x keys] mask is built). It is the all-gather form of context parallelism
(Llama 3, §3.3.2), which trades ring attention's overlap for one collective per layer; the keys held are the whole
sequence's.

Under megatron-core's static KV cache (training/eval/kv_cache.py), a decoding step's queries are the newest of the
cached keys: causality is then aligned at the lower right (`_causal`), as megatron's own attention does by turning
its mask off once the cache holds the prompt.

It has no parameters, so a model built with it loads and saves the same checkpoints as one built without it. It
patches nothing: the MTP loss's token count under CP, the one other CP gap, is fixed once per process by
`training.parallel.patches.mtp_tokens_over_cp`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from training.model import salient_attention


def global_positions(seq_length_local: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions in the full sequence of the tokens a CP rank holds: its chunks r and 2 x CP - 1 - r."""
    chunk = seq_length_local // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def position_order(seq_length_local: int, cp_size: int, device=None) -> torch.Tensor:
    """The permutation that puts the all-gathered keys (rank 0's tokens, then rank 1's, ...) in sequence order."""
    gathered = torch.cat([global_positions(seq_length_local, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(gathered)


def _chunk_ends(seq_length_local: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """(chunk length, end position) of the rank's two query chunks. Each sees every key up to its own end, causally
    at the diagonal: a lower-right-aligned causal bias, which SDPA's fused kernels take without building a mask."""
    chunk = seq_length_local // 2
    return [(chunk, (index + 1) * chunk) for index in (cp_rank, 2 * cp_size - 1 - cp_rank)]


def _causal(queries: int, keys: int) -> dict:
    """SDPA's causal arguments when the queries are the last `queries` of `keys` positions: `is_causal` when they
    are all of them (training, a prompt's prefill); no mask for one query (a KV cache's decode step: the newest token
    sees every cached key); otherwise the lower-right-aligned causal bias. SDPA's `is_causal` aligns upper-left, so
    with a cache it would let the newest token see only the first key."""
    if queries == keys:
        return {"is_causal": True}
    if queries == 1:
        return {}
    return {"attn_mask": causal_lower_right(queries, keys)}


class CausalSdpaAttention(torch.nn.Module):
    """Drop-in for megatron-core's `DotProductAttention` (core attention: [s, b, heads, dim] in, [s, b, heads x v]
    out), with or without context parallelism. Causal self-attention only; packed sequences and explicit masks are
    refused."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, k_channels: int | None = None,
                 v_channels: int | None = None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__()
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CausalSdpaAttention supports causal masks only, got {attn_mask_type}")
        self.config = config
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        head_dim = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("CausalSdpaAttention takes packed samples as an attention_mask "
                                      "(training/model/packing.py), not packed_seq_params or attention_bias")
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        if attention_mask is not None and cp_size > 1:
            raise NotImplementedError("packed samples (an attention_mask) under context parallelism: CP splits the "
                                      "sequence by position, not by sample; set parallel.context_parallel_size 1")
        if cp_size > 1:   # [s_local, b, heads, dim] -> [s_local x CP, b, heads, dim], in sequence order
            order = position_order(query.size(0), cp_size, device=query.device)
            key, value = (gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=True,
                                                               group=self.cp_group).index_select(0, order)
                          for t in (key, value))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))   # [b, heads, s, dim]
        if k.size(1) != q.size(1):   # grouped-query attention: each key/value head serves a group of query heads
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        if cp_size == 1 and attention_mask is None:   # KSSM's attention objective, while it is observed
            salient_attention.record(q, k, self.softmax_scale)
        v_dim = v.size(-1)
        if v_dim < q.size(-1):   # MLA: values 128 wide, queries and keys 192. Flash kernels need one head size, so
            v = F.pad(v, (0, q.size(-1) - v_dim))   # pad the values with zeros and drop those output columns
        dropout = self.dropout if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())   # as megatron: without SP the TP ranks' heads draw apart
        with rng:
            if attention_mask is not None:   # packed samples: megatron's mask is True where SDPA must not look
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                                                     scale=self.softmax_scale)
            elif cp_size == 1:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.softmax_scale,
                                                     **_causal(q.size(2), k.size(2)))
            else:
                out = torch.cat([F.scaled_dot_product_attention(
                    q[:, :, i * chunk:(i + 1) * chunk], k[:, :, :end], v[:, :, :end],
                    attn_mask=causal_lower_right(chunk, end), dropout_p=dropout, scale=self.softmax_scale)
                    for i, (chunk, end) in enumerate(_chunk_ends(query.size(0), cp_size, cp_rank))], dim=2)
        b, heads, s, _ = out.shape
        return out[..., :v_dim].permute(2, 0, 1, 3).reshape(s, b, heads * v_dim)

