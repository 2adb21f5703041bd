"""GRPO's policy-update loss (training/rl/policy_loss.py) in megatron-core's forward-step contract.

Without megatron: the per-micro-batch (sum, count) the loss returns, put through the schedule's arithmetic (each
micro-batch's sum / count, averaged over micro-batches), gives `grpo_loss` on the whole batch and its gradient, for
each aggregation; the reported [sum, count] pairs add up to the same value.
With megatron (policy_loss_probe.py, in fresh processes): one real GPTTrainModule step of the micro preset (MLA, MoE,
MTP, a vocabulary subset) reports `grpo_loss` of a plain forward on the whole batch and has its gradient, with the
MTP loss off; EP2 and PP2 (one torchrun launch) give the same loss and the same updated weights as one process.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from training.rl.grpo_loss import grpo_loss
from training.rl.policy_loss import MEAN_RESPONSE_TOKENS, GRPOLoss, policy_samples
from training.rl.rollout import Rollout

PROBE = "tests/training/rl/policy_loss_probe.py"
AGGREGATIONS = {"sequence": {}, "token": {}, "dr_grpo": {"max_tokens": 16}}
EPSILON, BETA = 0.2, 0.04


def _rollout(rows: int = 8, length: int = 13) -> Rollout:
    """Random ids (never looked up here), responses of 0 to 12 tokens (one empty, one cut off), 2 groups of 4, the
    second with zero advantages."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (rows, length), generator=g)
    mask = torch.zeros(rows, length - 1, dtype=torch.bool)
    for i, (start, size) in enumerate([(2, 5), (3, 0), (1, 11), (4, 8), (2, 1), (5, 3), (1, 7), (3, 9)][:rows]):
        mask[i, start:start + size] = True
    old = torch.where(mask, -torch.rand(rows, length - 1, generator=g) * 3, 0.0)
    advantages = torch.tensor([0.9, -1.1, 0.4, -0.2, 0, 0, 0, 0])[:rows]
    return Rollout(tokens=tokens, response_mask=mask, old_logp=old, rewards=torch.zeros(rows // 4, 4), scores={},
                   advantages=advantages, group_size=4, prompt_index=[i // 4 for i in range(rows)],
                   prompt_lengths=[1] * rows, completions=[""] * rows, stop_reasons=["eod"] * rows, stats={})


def _stacked(samples, rows) -> dict:
    return {key: torch.stack([samples[i][key] for i in rows]) for key in samples[0]}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_the_schedules_micro_batch_means_are_grpo_loss_on_the_whole_batch(aggregation):
    ro = _rollout()
    g = torch.Generator().manual_seed(1)
    ref = torch.where(ro.response_mask, ro.old_logp + 0.1 * torch.randn(ro.old_logp.shape, generator=g), 0.0)
    samples = policy_samples(ro, seq_length=16, global_batch_size=8, ref_logp=ref)   # padded 12 -> 16 positions
    whole = _stacked(samples, range(8))
    logp0 = whole["old_logp"] + 0.3 * torch.randn(whole["old_logp"].shape, generator=g)   # ratios beyond 1 ± ε
    logp0[~whole["loss_mask"].bool()] = float("nan")   # what padding holds must not matter
    loss = GRPOLoss(epsilon=EPSILON, beta=BETA, aggregation=aggregation, **AGGREGATIONS[aggregation])

    logp = logp0.clone().requires_grad_()
    expected, stats = grpo_loss(logp, whole["old_logp"], whole["ref_logp"], whole["advantages"][:, 0],
                                whole["loss_mask"], epsilon=EPSILON, beta=BETA, aggregation=aggregation,
                                **AGGREGATIONS[aggregation])
    expected.backward()

    # 2 data-parallel ranks x 2 micro-batches of 2: megatron's schedule (calculate_per_token_loss off) divides each
    # micro-batch's sum by its count and by the micro-batches; DDP averages the ranks.
    mine = logp0.clone().requires_grad_()
    total, reported = 0.0, {}
    for rows in (range(2), range(2, 4), range(4, 6), range(6, 8)):
        numerator, count, parts = loss.reduce(mine[list(rows)], _stacked(samples, rows))
        assert count.dtype == torch.int and int(count) == 2
        total = total + numerator / count / 2 / 2
        for name, pair in parts.items():
            reported[name] = reported.get(name, 0) + pair
    total.backward()
    assert torch.allclose(mine.grad, logp.grad, atol=1e-7, rtol=1e-6)
    assert abs(float(total.detach()) - float(expected.detach())) < 1e-6
    value = {name: float(pair[0] / pair[1]) for name, pair in reported.items()}
    assert abs(value["grpo loss"] - float(expected.detach())) < 1e-6
    assert abs(value["kl"] - float(stats["kl"])) < 1e-6
    assert abs(value["clip fraction"] - float(stats["clip_fraction"])) < 1e-6 and value["clip fraction"] > 0


def test_beta_zero_needs_no_ref_logp_and_reports_no_kl():
    samples = policy_samples(_rollout(), seq_length=12, global_batch_size=8)
    assert "ref_logp" not in samples.extra_keys
    batch = _stacked(samples, range(4))
    logp = batch["old_logp"] - 0.1
    _, _, reported = GRPOLoss(epsilon=EPSILON, beta=0.0, aggregation="sequence").reduce(logp, batch)
    assert reported["kl"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="ref_logp"):
        GRPOLoss(epsilon=EPSILON, beta=BETA, aggregation="sequence").reduce(logp, batch)


def test_the_token_mean_needs_its_steps_response_tokens():
    ro = _rollout()
    samples = policy_samples(ro, seq_length=12, global_batch_size=4)   # two steps of 4 rows
    lengths = ro.response_mask.sum(1).float()
    assert samples[0][MEAN_RESPONSE_TOKENS].tolist() == [lengths[:4].mean().item()] * 12
    assert samples[7][MEAN_RESPONSE_TOKENS].tolist() == [lengths[4:].mean().item()] * 12
    loss = GRPOLoss(epsilon=EPSILON, beta=0.0, aggregation="token")
    batch = _stacked(samples, [3, 4])   # rows of two different steps
    with pytest.raises(ValueError, match="one optimizer step"):
        loss.reduce(batch["old_logp"], batch)
    del batch[MEAN_RESPONSE_TOKENS]
    with pytest.raises(KeyError, match=MEAN_RESPONSE_TOKENS):
        loss.reduce(batch["old_logp"], batch)


def test_policy_samples_carry_the_rollout_keys_for_the_micro_batches():
    ro = _rollout()
    samples = policy_samples(ro, seq_length=12, global_batch_size=8, ref_logp=ro.old_logp - 1)
    assert len(samples) == 8 and samples.extra_keys == ("old_logp", "advantages", "ref_logp", MEAN_RESPONSE_TOKENS)
    assert samples[2]["tokens"].tolist() == ro.tokens[2, :-1].tolist()
    assert samples[2]["labels"].tolist() == ro.tokens[2, 1:].tolist()
    assert samples[2]["advantages"].tolist() == [pytest.approx(0.4)] * 12
    assert torch.equal(samples[5]["ref_logp"], torch.where(ro.response_mask[5], ro.old_logp[5] - 1, 0.0))
    with pytest.raises(ValueError, match="global batches"):
        policy_samples(ro, seq_length=12, global_batch_size=3)
    with pytest.raises(ValueError, match="max_tokens"):
        GRPOLoss(epsilon=EPSILON, beta=0.0, aggregation="dr_grpo")


# ---- real megatron-core steps ------------------------------------------------------------------------------------

def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The probe's one-process step per aggregation: (its report, the folder with its samples and releases)."""
    from tests.support.processes import REPO, run_python

    out = tmp_path_factory.mktemp("policy_loss")
    return _json(run_python(str(REPO / PROBE), "single", str(out), timeout=300)), out


def test_one_step_reports_grpo_loss_of_the_whole_batch_and_follows_its_gradient(one_process):
    report, _ = one_process
    assert report["world"] == 1
    for aggregation, r in report["aggregations"].items():
        assert abs(r["loss"] - r["expected"]) <= 1e-5, (aggregation, r)
        assert abs(r["kl"] - r["expected_kl"]) <= 1e-6 and r["kl"] > 0, (aggregation, r)
        assert abs(r["clip_fraction"] - r["expected_clip_fraction"]) <= 1e-6 and r["clip_fraction"] > 0
        # the gradient of grpo_loss (+ the balance losses) on the whole batch, element by element
        assert r["grad_max_diff"] <= 1e-6 * max(1.0, r["grad_max_abs"]), (aggregation, r)
        # ... and not the one with the MTP loss in it: the check can tell
        assert r["grad_max_diff_if_mtp_trained"] > 1e-3, (aggregation, r)
        assert r["mtp_loss"] > 0   # still logged
    # the token mean is over the whole step, not over each micro-batch
    assert report["aggregations"]["token"]["grad_max_diff_if_token_mean_per_micro_batch"] > 1e-3


@pytest.mark.slow
@pytest.mark.extended   # the suite's GRPO stage layout test (tests/training/stages/test_grpo.py) checks EP2 and PP2
def test_ep2_and_pp2_give_the_one_process_loss_and_update(one_process):   # for the default aggregation
    from tests.support.processes import REPO, repo_env, torchrun

    single, out = one_process
    proc = subprocess.run([sys.executable, "-W", "ignore", *torchrun(2),
                           str(REPO / PROBE), "layouts", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=repo_env(), check=False)
    report = _json(proc)
    assert report["world"] == 2
    for aggregation, r in single["aggregations"].items():
        for layout in ("EP2", "PP2"):
            name = f"{layout}-{aggregation}"
            assert abs(report["losses"][name] - r["loss"]) <= 1e-5, (name, report)
            # after one AdamW step of lr 1e-3 (each weight moves by about 1e-3)
            assert report["param_max_diff"][name] <= 1e-5, (name, report)
