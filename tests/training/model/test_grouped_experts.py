"""Grouped expert GEMMs (`parallel.moe_grouped_gemm`, training/model/grouped_experts.py): the micro model with
GroupedExperts computes what megatron's SequentialMLP computes, forward and gradients, on the same parameters; one
MoE layer's experts agree on hand-chosen groups, empty ones and no tokens at all included; what cannot run is
refused, naming the field."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.processes import run_python

PROBE = "tests/training/model/grouped_experts_probe.py"


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_grouped_experts_match_the_sequential_ones(precision, tolerance):
    out = run_python(PROBE, precision)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["expert_classes"] == ["GroupedExperts", "SequentialMLP"]
    assert result["mtp_experts"] == ["GroupedExperts"]          # MTP's MoE layer copies the decoder's spec
    assert result["same_state_dict_keys"]                       # one checkpoint format for both
    sequential, grouped = result["losses"]
    assert abs(grouped - sequential) <= tolerance * abs(sequential), result
    assert result["worst_grad_diff"] <= tolerance * max(1.0, result["grad_scale"]), result
    assert [d["tokens"] for d in result["direct"]] == [18, 0]
    for direct in result["direct"]:
        assert max(direct["output"], direct["input_grad"], direct["weight_grad"]) <= tolerance, direct


def test_grouped_experts_in_fp8_are_refused_naming_the_field():
    from training.config import resolve_stage_config

    with pytest.raises(ValueError, match="parallel.moe_grouped_gemm: grouped expert GEMMs in FP8 are not built"):
        resolve_stage_config("pretrain", "micro", overrides=["parallel.moe_grouped_gemm=true",
                                                             "train.precision=fp8"])


def test_what_grouped_mm_cannot_do_is_refused_with_the_reason(monkeypatch):
    from training.model.grouped_experts import GroupedGemmUnavailable, check_grouped_mm

    with pytest.raises(GroupedGemmUnavailable, match=r"dimensions \[36\] in torch.bfloat16 .*multiples of 8"):
        check_grouped_mm(torch.bfloat16, torch.device("cpu"), 128, 36)
    check_grouped_mm(torch.float32, torch.device("cpu"), 128, 36)   # 144 bytes a row: fine
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(GroupedGemmUnavailable, match="has no torch._grouped_mm; use the sequential experts"):
        check_grouped_mm(torch.float32, torch.device("cpu"), 128, 64)


@pytest.mark.slow
@pytest.mark.extended
def test_grouped_experts_under_ep2_train_as_one_sequential_process_does(micro_corpus, one_process_run, tmp_path):
    """Each EP rank groups its own local experts' tokens; the dispatcher's all-to-alls are unchanged: the layout
    tests' EP2 run with grouped experts gives the one-process sequential losses (their tolerance: 1e-5)."""
    from tests.support.layouts import LAYOUTS, STEPS, command, losses, run

    processes, overrides = LAYOUTS["EP2"]
    run(command(tmp_path, micro_corpus, processes, "parallel.moe_grouped_gemm=true", *overrides))
    single, grouped = losses(one_process_run), losses(tmp_path)
    assert sorted(grouped) == sorted(single) == list(range(1, STEPS + 1))
    assert all(abs(grouped[s] - single[s]) < 1e-5 for s in single), (grouped, single)
