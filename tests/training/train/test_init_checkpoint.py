"""`init_checkpoint`: the pretrain stage starts from a release's weights instead of a random init, in any layout,
with a new context (YaRN, longer sequences); a different architecture is refused before any step."""
from __future__ import annotations

import json

import pytest
import torch

from tests.support.layouts import command, run


def _weights(release, tmp_path, name) -> dict[str, torch.Tensor]:
    """A release's tensors by checkpoint key, read with torch.distributed.checkpoint (no megatron, no layout)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(release), str(tmp_path / f"{name}.pt"))
    state = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor) and "_extra_state" not in key}


@pytest.mark.slow
def test_training_starts_from_the_release_in_another_layout_and_context(micro_corpus, one_process_run, tmp_path):
    release = one_process_run / "pretrain" / "release"   # run A: one process, 4 layers, 4 steps
    # An EP2 + distributed-optimizer run with YaRN over sequences twice as long, at a learning rate (1e-12) and bias
    # update speed (0) that leave the weights where they start: so they must end where run A ended.
    extended = run(command(tmp_path / "b", micro_corpus, 2, f"init_checkpoint={release}", "train.steps=2",
                             "parallel.expert_model_parallel_size=2", "parallel.use_distributed_optimizer=true",
                             "model.rope_scaling.factor=2", "model.rope_scaling.original_max_position_embeddings=32",
                             "train.seq_length=64", "optimizer.lr=1e-12", "optimizer.min_lr=0",
                             "model.moe_router_bias_update_rate=0"))
    assert f"pretrain: initialised the weights from {release}" in extended.stdout, extended.stdout[-3000:]
    before = _weights(release, tmp_path, "a")
    after = _weights(tmp_path / "b" / "pretrain" / "release", tmp_path, "b")
    assert sorted(after) == sorted(before) and len(before) > 50
    worst = max((after[k].float() - before[k].float()).abs().max().item() for k in before)
    assert worst < 1e-8, worst   # without the load: 6e-3 (run B's own init vs A's trained weights)
    released = json.loads((tmp_path / "b" / "pretrain" / "release" / "seekflow_model.json").read_text())
    assert released["rope_scaling"]["factor"] == 2
    manifest = json.loads((tmp_path / "b" / "pretrain" / "manifest.json").read_text())
    assert manifest["inputs"]["init_checkpoint"] == str(release)

    refused = run(command(tmp_path / "c", micro_corpus, 1, f"init_checkpoint={release}", "model.num_layers=3"),
                  check=False)
    assert refused.returncode != 0, refused.stdout[-3000:]
    assert "model.num_layers: 4 in the checkpoint, 3 now" in refused.stdout + refused.stderr, refused.stderr[-3000:]
    assert "pretrain: step" not in refused.stdout
