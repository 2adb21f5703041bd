"""Selective activation recompute (`parallel.recompute`, megatron-core's recompute modules): it really keeps fewer
activations for backward, and leaves the loss and gradients as they were."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.processes import REPO
from training.config import ConfigError, resolve_stage_config


@pytest.fixture(scope="module")
def probe() -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-W", "ignore", str(REPO / "tests/training/parallel/recompute_probe.py")],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["setting"]: row for row in rows}


def test_recompute_keeps_fewer_activations_for_backward(probe):
    none, v3, everything = (probe[name]["kept_bytes"] for name in ("none", "v3", "all"))
    assert v3 < none            # the RMSNorm and MLA up-projection outputs are freed after use
    assert everything < 0.5 * none


@pytest.mark.parametrize("setting", ["v3", "all"])
def test_recompute_leaves_loss_and_gradients_unchanged(probe, setting):
    assert probe[setting]["loss_diff"] == 0.0
    assert probe[setting]["grad_max_diff"] <= 1e-6   # recomputed in a different order: float rounding at most
    assert probe[setting]["grad_count"] == probe["none"]["grad_count"]


def test_deepseek_v3_recomputes_its_norms_and_mla_up_projections():
    assert resolve_stage_config("pretrain", "deepseek-v3").parallel.recompute == ["layernorm", "mla_up_proj"]


def test_recompute_modules_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"parallel.recompute"):
        resolve_stage_config("pretrain", "tiny", overrides=["parallel.recompute=[moe_act]"])  # needs TE's grouped GEMM
    with pytest.raises(ConfigError, match=r"'mla_up_proj', but this model has none \(model.multi_latent_attention\)"):
        resolve_stage_config("pretrain", "tiny", overrides=["parallel.recompute=[mla_up_proj]",
                                                            "model.multi_latent_attention=false"])
    with pytest.raises(ConfigError, match=r"'shared_experts', but this model has none \(model.moe_shared_experts\)"):
        resolve_stage_config("pretrain", "tiny", overrides=["parallel.recompute=[shared_experts]",
                                                            "model.moe_shared_experts=0"])
