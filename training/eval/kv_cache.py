"""The decoder half of megatron-core's GPTModel, with or without megatron-core's own KV cache.

`hidden_states` runs embedding + decoder + final norm over a token batch (the part of `GPTModel.forward` before the
output layer; evaluation projects only the positions it needs and skips MTP, which DeepSeek-V3 §2.2 uses for
training only). Passed megatron-core's `StaticInferenceContext`, the same call decodes incrementally: that is `KVCache`.

What megatron-core 0.16.1's static KV cache does, and so what `KVCache` relies on:
  - the context holds, per layer, a key and a value buffer [max length, batch, heads, head dim], which MLA's
    `_adjust_key_value_for_inference` allocates at first use, writes at `sequence_len_offset` and returns up to the
    offset plus the new tokens. It caches MLA's up-projected keys and values (megatron caches MLA's compressed
    latents, `cache_mla_latents`, only in its dynamic, paged context, whose kernels are GPU-only);
  - MLA rotates queries and keys (RoPE or YaRN) for positions `sequence_len_offset`, `+1`, ...: one offset for the
    whole batch, so every row of a batch is at the same position;
  - once the offset is past 0 megatron turns the causal mask off; seekflow's `CausalSdpaAttention` (which replaces
    megatron's core attention in every layer) aligns causality at the lower right when keys outnumber queries.

Prompts of different lengths therefore decode as megatron's own static-batching controller does them
(`TextGenerationController.generate_all_output_tokens_static_batch`): prefill every row up to the shortest prompt, then
one position per step for every row; a row still inside its prompt is fed its next prompt token and what it would have
sampled is ignored (the Generator's loop). Each row keeps its own positions 0, 1, 2, ... and attends to its own tokens
only: no padding and no masks, so the tokens are those of the uncached path, which right-pads.

The model must be in eval mode: megatron takes its inference path only then.
"""
from __future__ import annotations

from typing import Sequence

import torch


def hidden_states(gpt, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                  inference_context=None) -> torch.Tensor:
    """Final-norm hidden states [seq, batch, hidden] of `tokens` [batch, seq] (the decoder half of GPTModel.forward);
    with `inference_context`, through its KV cache (the caller advances its offset)."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], dtype=torch.long, device=tokens.device).expand_as(tokens)
    # megatron-core 0.16.1's own preprocessing (embedding + rotary tables); pinned, so the private call is stable.
    decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, len_offset, padding_mask = gpt._preprocess(
        input_ids=tokens, position_ids=positions, inference_context=inference_context)[:6]
    return gpt.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                       rotary_pos_cos=rotary_cos, rotary_pos_sin=rotary_sin, sequence_len_offset=len_offset,
                       padding_mask=padding_mask, inference_context=inference_context)


class KVCache:
    """Incremental decoding of a batch of `batch_size` rows, up to `max_length` positions, through megatron-core's
    `StaticInferenceContext`. Every row advances by the same number of positions per `step`."""

    def __init__(self, gpt, batch_size: int, max_length: int, forward=None):
        from megatron.core.inference.contexts import StaticInferenceContext

        if gpt.training:
            raise ValueError("KVCache needs the model in eval mode (megatron's inference path is taken only then)")
        self.gpt = gpt
        # `forward(tokens, positions, context)`: the final hidden states, or None on a pipeline stage before the last
        # (model_parallel.ModelParallelForward.forward); default: the whole model in this process
        self.forward = forward or (lambda tokens, positions, context: hidden_states(gpt, tokens, positions, context))
        self.context = StaticInferenceContext(max_batch_size=batch_size, max_sequence_length=max_length)

    @property
    def length(self) -> int:
        """Positions every row has in the cache."""
        return self.context.sequence_len_offset

    def step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Feed `tokens` [batch, n] at positions length .. length + n - 1; the final-norm hidden state of each row's
        last position [batch, hidden] (None on a pipeline stage before the last)."""
        start = self.length
        if start + tokens.shape[1] > self.context.max_sequence_length:
            raise ValueError(f"{start} cached + {tokens.shape[1]} new positions exceed the cache's "
                             f"{self.context.max_sequence_length}")
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        hidden = self.forward(tokens, positions, self.context)
        self.context.increment_sequence_len_offset(tokens.shape[1])
        return None if hidden is None else hidden[-1]

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every batch row but `rows` (in this order) from the cache, e.g. rows that finished: later steps
        compute only the rest. (megatron's `swap_key_value_dict` reorders rows but cannot drop them.)"""
        memory = self.context.key_value_memory_dict
        for layer, buffers in memory.items():
            index = torch.as_tensor(list(rows), dtype=torch.long, device=buffers[0].device)
            memory[layer] = tuple(buffer.index_select(1, index) for buffer in buffers)
