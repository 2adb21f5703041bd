"""Decoding on one shard of a model-parallel GPTModel: the forward passes of a `Generator` whose model is this rank's
pipeline stage and expert shard of the policy being trained (GRPO's rollouts run on the weights the update trains:
no second, whole copy of the model to keep in sync).

Two kinds of ranks take part in one forward pass, and each needs something different:
  - **Pipeline stages** (PP) hold different layers of the same rows. The first stage embeds the tokens; each stage
    runs its layers and sends the hidden states [seq, batch, hidden] to the next (point-to-point, as megatron's
    pipeline schedules do); the last applies the final norm and the output layer. What a step produces there (the
    logits of the rows' last positions, or token NLLs) is broadcast back over the pipeline group, so every stage
    takes the same sampling decisions from the same numbers: the rows stay in step without exchanging tokens.
  - **Expert-parallel ranks** (EP) decode different rows (each data-parallel rank samples its own share of the
    prompts) but exchange tokens inside every MoE layer (megatron's all-to-all dispatcher), so they must run the
    same number of forward passes. They advance in *lockstep*: before each decoding step the ranks agree, with one
    all-reduce over the expert-parallel group, whether any of them still has a live row; a rank whose rows have all
    ended runs an idle forward (one padding token, no cache, output unused) that only joins the others' exchanges.

Tensor and context parallelism are not handled here: under sequence parallelism megatron splits the sequence across
tensor-parallel ranks, which one decoded position cannot be, and context parallelism splits it across ranks too. The
grpo config refuses them, naming the field.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from training.eval.kv_cache import hidden_states


class ModelParallelForward:
    """This rank's part in the forward passes of a model-parallel `gpt` (built for the current megatron parallel
    state: `training.model.build.build_gpt` or `load_release` with the run's parallel config)."""

    def __init__(self, gpt):
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_context_parallel_world_size() > 1:
            raise ValueError("decoding under tensor or context parallelism is not built (sequence-split layouts); "
                             "use pipeline and expert parallelism")
        self.gpt = gpt
        self.pipeline = ps.get_pipeline_model_parallel_group()
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.previous = None if self.first else ps.get_pipeline_model_parallel_prev_rank()
        self.next = None if self.last else ps.get_pipeline_model_parallel_next_rank()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.experts = ps.get_expert_model_parallel_group()
        self.hidden_size = gpt.config.hidden_size
        self.dtype = next(gpt.parameters()).dtype       # the activations passed between stages
        self.device = next(gpt.parameters()).device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                inference_context=None) -> torch.Tensor | None:
        """`hidden_states` of `tokens` [batch, seq] through every stage: the final-norm hidden states
        [seq, batch, hidden] on the last stage, None on the others (which pass theirs on)."""
        if not self.first:
            received = torch.empty((tokens.shape[1], tokens.shape[0], self.hidden_size), dtype=self.dtype,
                                   device=self.device)
            dist.recv(received, self.previous)
            self.gpt.set_input_tensor(received)
        hidden = hidden_states(self.gpt, tokens, positions, inference_context)
        if not self.last:
            dist.send(hidden.contiguous(), self.next)
            return None
        return hidden

    def from_last_stage(self, compute: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        """`compute()` on the last stage (a tensor of any shape), the same values on every stage of the pipeline.
        Other stages pass None (or anything: it is not called there)."""
        if self.pipeline.size() == 1:
            return compute()
        if self.last:
            value = compute().contiguous()
            header = torch.tensor([_DTYPES.index(value.dtype), value.dim(), *value.shape], device=self.device)
            dist.broadcast(torch.tensor([header.numel()], device=self.device), self.last_rank, group=self.pipeline)
            dist.broadcast(header, self.last_rank, group=self.pipeline)
            dist.broadcast(value, self.last_rank, group=self.pipeline)
            return value
        size = torch.empty(1, dtype=torch.long, device=self.device)
        dist.broadcast(size, self.last_rank, group=self.pipeline)
        header = torch.empty(int(size), dtype=torch.long, device=self.device)
        dist.broadcast(header, self.last_rank, group=self.pipeline)
        value = torch.empty(header[2:].tolist(), dtype=_DTYPES[int(header[0])], device=self.device)
        dist.broadcast(value, self.last_rank, group=self.pipeline)
        return value

    def any_live(self, live: bool) -> bool:
        """Whether any expert-parallel rank still has a row to decode (every such rank calls this at each step)."""
        if self.experts.size() == 1:
            return live
        flag = torch.tensor([int(live)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.experts)
        return bool(flag.item())

    def idle(self, pad_id: int, to_rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A forward pass that only joins the other expert-parallel ranks' token exchanges (its output is unused)."""
        self.forward(to_rows(torch.full((1, 1), pad_id, dtype=torch.long)))


# What `from_last_stage` can send: logits (float32) and NLLs (float64).
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.long)
