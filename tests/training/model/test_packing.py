"""Packed SFT samples stay apart (DeepSeek-V3 §5.1): a sample's logits are the same packed with others as alone, in
one process and under EP2 and PP2 (real megatron-core forward passes through its own pipeline schedule)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.processes import REPO, repo_env, torchrun

PROBE = str(REPO / "tests/training/model/packing_probe.py")


def _probe(*argv: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-W", "ignore", *argv], capture_output=True, text=True, cwd=REPO,
                         env=repo_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_sample_mask_allows_own_earlier_tokens_only():
    from training.model.packing import sample_mask

    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = ~sample_mask(positions)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_a_packed_sample_scores_as_it_does_alone_in_one_process():
    report = _probe(PROBE)[-1]
    assert report["world"] == 1 and report["tokens"] > 10
    assert report["max_logit_diff"] <= 1e-6 and report["max_loss_diff"] <= 1e-6, report
    assert report["other_samples_differ"] > 1e-3   # the comparison is not vacuous: B's tokens are not A's
    # positions restart per sample in the rotary tables MLA applies (the model's own position_ids never reach them)
    assert report["rotary_at_sample_positions"] and report["rotary_restarts"]
    assert report["rotary_shape"][:3] == [64, 1, 1]


TWO_PROCESS_LAYOUTS = ["ep=2", "pp=2"]


@pytest.fixture(scope="module")
def two_process_reports() -> dict[str, dict]:
    """Both layouts in one torchrun launch (the probe runs them in turn on the same processes): {layout: report}."""
    reports = {r["layout"]: r for r in _probe(*torchrun(2), PROBE,
                                              *TWO_PROCESS_LAYOUTS)}
    assert sorted(reports) == sorted(TWO_PROCESS_LAYOUTS), reports
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("layout", TWO_PROCESS_LAYOUTS)
def test_a_packed_sample_scores_as_it_does_alone_in_two_process_layouts(layout, two_process_reports):
    report = two_process_reports[layout]
    assert report["world"] == 2 and report["max_loss_diff"] <= 1e-6, report
