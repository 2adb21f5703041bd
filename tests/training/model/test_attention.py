"""Core attention (training/model/attention.py) against plain causal attention over the whole sequence.

The test runs this file under torchrun as a probe (CP = 1, 2 and 4): each rank holds megatron's two chunks of the
sequence, and its outputs and its share of the query/key/value gradients must equal the whole-sequence reference's.
In one process, megatron-core's own local DotProductAttention, which it replaces, is checked against the reference
too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from training.model.attention import global_positions, position_order

SEQ, BATCH, HEADS, QK_DIM, V_DIM, SCALE = 16, 2, 3, 6, 5, 0.37


def test_each_rank_holds_chunks_r_and_2cp_minus_1_minus_r():
    # CP=2, 16 tokens: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (get_batch_on_this_cp_rank)
    assert global_positions(8, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert global_positions(8, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # every position exactly once over the ranks
    held = torch.cat([global_positions(4, 4, r) for r in range(4)])
    assert sorted(held.tolist()) == list(range(16))


def test_position_order_sorts_the_gathered_keys():
    gathered = torch.cat([global_positions(8, 2, r) for r in range(2)])   # rank 0's 8 tokens, then rank 1's
    assert gathered[position_order(8, 2)].tolist() == list(range(16))


def _reference(q, k, v):
    """Causal attention over the whole sequence in plain torch: [s, b, h, d] -> [s, b, h x v]."""
    k, v = (t.repeat_interleave(HEADS // t.size(2), dim=2) for t in (k, v))   # grouped-query: share k/v heads
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * SCALE
    scores = scores.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(dim=-1), v)
    return out.reshape(SEQ, BATCH, HEADS * V_DIM)


def _probe() -> None:
    from training.config import ParallelConfig
    from training.parallel.setup import init_distributed, shutdown

    cp = int(os.environ["WORLD_SIZE"])
    info = init_distributed(ParallelConfig(context_parallel_size=cp), seed=7)
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from training.model.attention import CausalSdpaAttention

    config = TransformerConfig(num_layers=1, hidden_size=HEADS * QK_DIM, num_attention_heads=HEADS,
                               context_parallel_size=cp, attention_dropout=0.0)
    implementations = {"": CausalSdpaAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=SCALE)}
    if cp == 1:   # megatron's, as MLA builds it: its own key and value head sizes
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        implementations["megatron "] = DotProductAttention(config, 1, AttnMaskType.causal, "self",
                                                           softmax_scale=SCALE, k_channels=QK_DIM, v_channels=V_DIM)
    mine = global_positions(SEQ // cp, cp, parallel_state.get_context_parallel_rank())
    generator = torch.Generator().manual_seed(0)   # the same full-sequence tensors on both ranks
    errors = {}
    for case, kv_heads in (("mha", HEADS), ("gqa", 1)):
        q, k, v = (torch.randn(SEQ, BATCH, heads, d, generator=generator, requires_grad=True)
                   for heads, d in ((HEADS, QK_DIM), (kv_heads, QK_DIM), (kv_heads, V_DIM)))
        upstream = torch.randn(SEQ, BATCH, HEADS * V_DIM, generator=generator)
        expected = _reference(q, k, v)
        expected.backward(upstream)
        for label, attention in implementations.items():
            if label and kv_heads != HEADS:   # megatron's expects one key/value head per group of its config
                continue
            local = [t.detach()[mine].clone().requires_grad_() for t in (q, k, v)]
            out = attention(*local, None)
            out.backward(upstream[mine])
            errors[f"{label}{case} out"] = (out - expected.detach()[mine]).abs().max().item()
            for name, full, part in zip("qkv", (q, k, v), local):
                errors[f"{label}{case} grad_{name}"] = (part.grad - full.grad[mine]).abs().max().item()
    gathered = [None] * cp
    torch.distributed.all_gather_object(gathered, errors)
    if info.is_main:
        print(json.dumps({"ranks": gathered}), flush=True)
    shutdown()


@pytest.mark.parametrize("cp", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_attention_equals_attention_over_the_whole_sequence(cp):
    from tests.support.processes import REPO, torchrun

    out = subprocess.run([sys.executable, "-W", "ignore", *torchrun(cp),
                          __file__, "probe"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["ranks"]
    assert len(ranks) == cp
    for errors in ranks:
        # forward, and the key/value gradients after the reduce-scatter of both ranks' contributions
        cases = ("mha", "gqa", "megatron mha") if cp == 1 else ("mha", "gqa")
        assert set(errors) == {f"{case} {what}" for case in cases for what in ("out", "grad_q", "grad_k", "grad_v")}
        assert max(errors.values()) < 1e-5, ranks


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    _probe()
