"""`train.precision: fp8` (training/model/fp8_spec.py): the block's linear layers run their GEMMs in blockwise FP8
(the CPU emulation) and the rest as bf16 does; it trains close to fp32 on the micro preset, releases bf16 weights
as a bf16 run does (fp32 masters in its checkpoints), and resumes bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.layouts import STEPS, command, losses, rerun_from_step_2, run
from tests.support.processes import run_python

PROBE = "tests/training/model/fp8_probe.py"


def test_the_blocks_linears_are_fp8_and_the_head_embedding_and_routers_are_not():
    out = run_python(PROBE)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    kinds = json.loads(out.stdout.strip().splitlines()[-1])
    fp8 = kinds["Fp8ColumnParallelLinear"] + kinds["Fp8RowParallelLinear"]
    assert kinds["ColumnParallelLinear"] == ["output_layer"] and "RowParallelLinear" not in kinds   # V3 §3.3
    assert kinds["VocabParallelEmbedding"] == ["embedding.word_embeddings"] and len(kinds["TopKRouter"]) == 3
    for part in ("self_attention.linear_q_down_proj", "self_attention.linear_kv_up_proj", "self_attention.linear_proj",
                 "layers.0.mlp.linear_fc1", "mlp.shared_experts.linear_fc2", "mlp.experts.local_experts.0.linear_fc1",
                 "mtp.layers.0.eh_proj"):
        assert any(name.endswith(part) or part in name for name in fp8), (part, fp8)


@pytest.mark.slow
def test_fp8_trains_close_to_fp32_releases_bf16_weights_and_resumes_exactly(micro_corpus, one_process_run, tmp_path):
    fp8 = command(tmp_path / "fp8", micro_corpus, 1, "train.precision=fp8", "train.save_interval=2")
    run(fp8)
    full, quantised = losses(one_process_run), losses(tmp_path / "fp8")
    assert sorted(quantised) == sorted(full) == list(range(1, STEPS + 1))
    assert all(abs(quantised[s] - full[s]) < 1e-2 for s in full), (quantised, full)   # near ln(512) = 6.24
    assert any(quantised[s] != full[s] for s in full)

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "fp8" / "pretrain" / "release"), str(tmp_path / "release.pt"))
    weights = {k: v for k, v in torch.load(tmp_path / "release.pt", weights_only=False).items()
               if isinstance(v, torch.Tensor) and k.endswith(".weight")}
    # the training precision's weights (bf16, as a bf16 run releases), never FP8 copies: it loads, exports and
    # evaluates as any release; the fp32 masters are in the checkpoints, which the resume below reads
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}

    resumed = rerun_from_step_2(tmp_path / "fp8", fp8)
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [quantised[3], quantised[4]]   # bit for bit
