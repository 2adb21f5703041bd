"""GRPO's objective against the papers, transcribed here as plain loops over groups, outputs and tokens (not
vectorised, never calling the module under test): DeepSeekMath eq. 3 with eq. 4's KL, DeepSeek-R1 eq. 1-3, DAPO's
token-level sum (eq. 8) and Dr. GRPO's constant denominator. Loss and gradient w.r.t. the policy's log-probs, fp64."""
from __future__ import annotations

import math

import pytest
import torch

from training.rl.grpo_loss import PRESETS, Aggregation, group_advantages, grpo_loss, k3_kl

TOL = 1e-6


# ---- the papers, transcribed -------------------------------------------------------------------------------------

def clip(x, low, high):
    return max(low, min(x, high))


def paper_token_term(logp, old_logp, ref_logp, advantage, epsilon, beta):
    """DeepSeekMath eq. 3's summand for one token o_{i,t}, with eq. 4's KL:
    min(π/π_old Â, clip(π/π_old, 1-ε, 1+ε) Â) - β (π_ref/π - log(π_ref/π) - 1)."""
    ratio = torch.exp(logp) / math.exp(old_logp)        # π_θ(o_t|q,o_<t) / π_θold(o_t|q,o_<t)
    surrogate = min(ratio * advantage, clip(ratio, 1 - epsilon, 1 + epsilon) * advantage)
    ref_over_pi = math.exp(ref_logp) / torch.exp(logp)  # π_ref / π_θ
    kl = ref_over_pi - torch.log(ref_over_pi) - 1
    return surrogate - beta * kl


def paper_objective(groups, epsilon, beta, aggregation, max_tokens=None):
    """J over a batch of questions. `groups`: per question, a list of outputs, each a dict with per-token lists
    (logp: 0-dim tensors with grad; old/ref: floats) and a float advantage. Only real tokens are listed: an output's
    length |o_i| is the length of its lists. The expectation over q is the mean over questions."""
    per_question = []
    if aggregation == "token":                          # DAPO eq. 8: one sum over every token of the batch
        total, count = 0.0, 0
        for outputs in groups:
            for o in outputs:
                for t in range(len(o["logp"])):
                    total = total + paper_token_term(o["logp"][t], o["old"][t], o["ref"][t], o["adv"], epsilon, beta)
                    count += 1
        return total / count
    for outputs in groups:
        G = len(outputs)
        question_sum = 0.0
        for o in outputs:
            output_sum = 0.0
            for t in range(len(o["logp"])):
                output_sum = output_sum + paper_token_term(o["logp"][t], o["old"][t], o["ref"][t], o["adv"],
                                                           epsilon, beta)
            if aggregation == "sequence":                # DeepSeekMath eq. 3 / R1 eq. 1: 1/|o_i| Σ_t
                question_sum = question_sum + output_sum / len(o["logp"])
            else:                                        # Dr. GRPO: Σ_t / (the generation budget)
                question_sum = question_sum + output_sum / max_tokens
        per_question.append(question_sum / G)            # 1/G Σ_i
    return sum(per_question) / len(per_question)


def paper_advantages(rewards, scale_by_std=True):
    """R1 eq. 3 (DeepSeekMath §4.1.2): Â_i = (r_i - mean(r)) / std(r), std with Bessel's n-1; Dr. GRPO drops std."""
    G = len(rewards)
    mean = sum(rewards) / G
    if not scale_by_std:
        return [r - mean for r in rewards]
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (G - 1))
    return [(r - mean) / std for r in rewards]


# ---- batches -----------------------------------------------------------------------------------------------------

def make_batch(lengths, advantages, T, seed=0, spread=0.6, garbage=float("nan")):
    """Tensors [B, T] for the module plus the same data as per-question lists for the transcription. `lengths` and
    `advantages` are lists per question. old_logp is logp shifted by up to ±spread, so ratios land on both sides
    of a 0.2 clip band. Padding holds `garbage`."""
    gen = torch.Generator().manual_seed(seed)
    B = sum(len(group) for group in lengths)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.05
    old_logp = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    ref_logp = logp + (torch.rand(B, T, generator=gen, dtype=torch.float64) * 2 - 1) * 0.5
    flat_lengths = [n for group in lengths for n in group]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(flat_lengths):
        mask[b, :n] = True
    for x in (logp, old_logp, ref_logp):
        x[~mask] = garbage
    logp.requires_grad_(True)
    groups, b = [], 0
    for group_lengths, group_adv in zip(lengths, advantages):
        outputs = []
        for n, adv in zip(group_lengths, group_adv):
            outputs.append({"logp": [logp[b, t] for t in range(n)], "old": [old_logp[b, t].item() for t in range(n)],
                            "ref": [ref_logp[b, t].item() for t in range(n)], "adv": adv})
            b += 1
        groups.append(outputs)
    adv = torch.tensor([a for group in advantages for a in group], dtype=torch.float64)
    return logp, old_logp, ref_logp, adv, mask, groups


def loss_and_grad(fn, logp):
    value = fn()
    (grad,) = torch.autograd.grad(value, logp)
    return value.detach(), grad


def assert_matches_paper(batch, *, epsilon, beta, aggregation, max_tokens=None):
    logp, old_logp, ref_logp, adv, mask, groups = batch
    ours, our_grad = loss_and_grad(lambda: grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon=epsilon, beta=beta,
                                                     aggregation=aggregation, max_tokens=max_tokens)[0], logp)
    paper, paper_grad = loss_and_grad(lambda: -paper_objective(groups, epsilon, beta, aggregation, max_tokens), logp)
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    assert abs(ours.item() - paper.item()) < TOL, (ours.item(), paper.item())
    assert (our_grad - paper_grad).abs().max().item() < TOL
    return ours, our_grad


# Two questions of G = 4; the first output is cut off at the length limit T = 9 (mask ones to the end), the others
# shorter, so the three aggregations weigh tokens differently.
LENGTHS = [[9, 3, 5, 1], [2, 7, 4, 6]]
ADVANTAGES = [[1.3, -0.4, 0.8, -1.7], [-0.9, 1.1, 0.6, -0.8]]
T = 9


# ---- the objective ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["sequence", "token", "dr_grpo"])
@pytest.mark.parametrize("epsilon", [0.2, 10.0])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_the_papers(aggregation, epsilon, beta):
    batch = make_batch(LENGTHS, ADVANTAGES, T)
    assert_matches_paper(batch, epsilon=epsilon, beta=beta, aggregation=aggregation, max_tokens=16)
    stats = grpo_loss(*batch[:5], epsilon=epsilon, beta=beta, aggregation=aggregation, max_tokens=16)[1]
    if epsilon == 0.2:   # this batch does clip on both sides, so the comparison covered both branches of min()
        assert stats["clip_high_fraction"] > 0 and stats["clip_low_fraction"] > 0
    else:
        assert stats["clip_fraction"] == 0


def test_aggregations_differ_on_unequal_lengths():
    """A guard on the comparison above: the three readings give different numbers on this batch."""
    batch = make_batch(LENGTHS, ADVANTAGES, T)
    losses = {a: grpo_loss(*batch[:5], epsilon=0.2, beta=0.04, aggregation=a, max_tokens=16)[0].item()
              for a in Aggregation}
    assert len({round(v, 9) for v in losses.values()}) == 3


def test_r1_equations_1_to_3_from_rewards():
    """DeepSeek-R1 eq. 3's advantages from raw rewards, then eq. 1 with eq. 2's KL, against the module's pipeline."""
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.5, 0.0]]
    advantages = [paper_advantages(r) for r in rewards]
    batch = make_batch(LENGTHS, advantages, T, seed=3)
    ours = group_advantages(torch.tensor(rewards, dtype=torch.float64), eps=0.0).reshape(-1)
    assert torch.allclose(ours, batch[3], atol=1e-12, rtol=0)
    assert_matches_paper((*batch[:3], ours, *batch[4:]), epsilon=10.0, beta=0.001, aggregation="sequence")


def test_dr_grpo_from_rewards():
    rewards = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    advantages = [paper_advantages(r, scale_by_std=False) for r in rewards]
    batch = make_batch(LENGTHS, advantages, T, seed=4)
    ours = group_advantages(torch.tensor(rewards, dtype=torch.float64), scale_by_std=False).reshape(-1)
    assert torch.allclose(ours, batch[3], atol=1e-12, rtol=0)
    assert_matches_paper((*batch[:3], ours, *batch[4:]), epsilon=0.2, beta=0.0, aggregation="dr_grpo", max_tokens=12)


def single_output(ratios, advantage, T=None):
    """One output whose tokens have the given π_θ/π_old ratios, reference = old."""
    logp = torch.log(torch.tensor([[0.5] * len(ratios)], dtype=torch.float64)).requires_grad_(True)
    old_logp = (logp.detach() - torch.log(torch.tensor([ratios], dtype=torch.float64)))
    mask = torch.ones_like(logp, dtype=torch.bool)
    groups = [[{"logp": [logp[0, t] for t in range(len(ratios))], "old": old_logp[0].tolist(),
                "ref": old_logp[0].tolist(), "adv": advantage}]]
    return logp, old_logp, old_logp.clone(), torch.tensor([advantage], dtype=torch.float64), mask, groups


def test_positive_advantage_clips_above_the_band():
    """Â > 0: tokens with ρ > 1+ε contribute (1+ε)Â and no gradient; ρ < 1-ε is not clipped (the min keeps ρÂ)."""
    batch = single_output([1.5, 1.1, 0.5, 1.25], advantage=2.0)
    loss, grad = assert_matches_paper(batch, epsilon=0.2, beta=0.0, aggregation="sequence")
    assert loss.item() == pytest.approx(-(1.2 * 2 + 1.1 * 2 + 0.5 * 2 + 1.2 * 2) / 4, abs=1e-12)
    assert grad[0, 0] == 0 and grad[0, 3] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0
    stats = grpo_loss(*batch[:5], epsilon=0.2, beta=0.0, aggregation="sequence")[1]
    assert stats["clip_fraction"].item() == 0.5 and stats["clip_high_fraction"].item() == 0.5
    assert stats["clip_low_fraction"].item() == 0


def test_negative_advantage_clips_below_the_band():
    """Â < 0: tokens with ρ < 1-ε contribute (1-ε)Â and no gradient; ρ > 1+ε is not clipped (ρÂ is the smaller)."""
    batch = single_output([0.5, 0.9, 1.5, 0.7], advantage=-1.0)
    loss, grad = assert_matches_paper(batch, epsilon=0.2, beta=0.0, aggregation="token")
    assert loss.item() == pytest.approx((0.8 + 0.9 + 1.5 + 0.8) / 4, abs=1e-12)
    assert grad[0, 0] == 0 and grad[0, 3] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0
    stats = grpo_loss(*batch[:5], epsilon=0.2, beta=0.0, aggregation="token")[1]
    assert stats["clip_low_fraction"].item() == 0.5 and stats["clip_high_fraction"].item() == 0
    assert stats["ratio_mean"].item() == pytest.approx((0.5 + 0.9 + 1.5 + 0.7) / 4)
    assert stats["ratio_max"].item() == pytest.approx(1.5)


def test_identical_rewards_leave_only_the_kl_term():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(4, dtype=torch.float64))
    batch = make_batch(LENGTHS, adv.tolist(), T, seed=5)
    logp, old_logp, ref_logp, _, mask, groups = batch
    assert_matches_paper(batch, epsilon=0.2, beta=0.04, aggregation="sequence")
    # The first question alone: its loss is β times the mean (per output, then over outputs) k3 KL.
    first = slice(0, 4)
    loss = grpo_loss(logp[first], old_logp[first], ref_logp[first], adv[0], mask[first], epsilon=0.2, beta=0.04,
                     aggregation="sequence")[0]
    kl = [sum((math.exp(r) / math.exp(p.item()) - math.log(math.exp(r) / math.exp(p.item())) - 1)
              for p, r in zip(o["logp"], o["ref"])) / len(o["logp"]) for o in groups[0]]
    assert loss.item() == pytest.approx(0.04 * sum(kl) / 4, abs=1e-12)
    assert grpo_loss(logp[first], old_logp[first], ref_logp[first], adv[0], mask[first], epsilon=0.2, beta=0.0,
                     aggregation="sequence")[0].item() == 0


def test_cut_off_output_and_garbage_padding():
    """An output at the length limit (no EOS, mask to the end) beside short ones; padding of inf, -inf or nan never
    reaches the loss or the gradient, which is zero on padding."""
    for garbage in (float("nan"), float("inf"), float("-inf")):
        batch = make_batch(LENGTHS, ADVANTAGES, T, seed=6, garbage=garbage)
        for aggregation in Aggregation:
            _, grad = assert_matches_paper(batch, epsilon=0.2, beta=0.04, aggregation=aggregation.value,
                                           max_tokens=T)
            assert (grad[~batch[4]] == 0).all()
            assert (grad[0] != 0).all()   # the cut-off output has a gradient on every token


def test_on_policy_gradient_is_advantage_times_score():
    """One update per exploration stage (DeepSeekMath §4.2): old = θ, so ρ = 1, nothing clips and with β = 0 the
    gradient of -J w.r.t. each log-prob is -Â_i / |o_i| / B (sequence aggregation)."""
    logp, _, ref_logp, adv, mask, _ = make_batch(LENGTHS, ADVANTAGES, T, seed=7)
    loss, stats = grpo_loss(logp, logp.detach(), ref_logp, adv, mask, epsilon=0.2, beta=0.0, aggregation="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    lengths = torch.tensor([n for group in LENGTHS for n in group], dtype=torch.float64)
    expected = (-adv / lengths / len(lengths)).unsqueeze(1).expand_as(grad) * mask
    assert torch.allclose(grad, expected, atol=1e-12, rtol=0)
    assert stats["clip_fraction"] == 0 and stats["ratio_mean"].item() == pytest.approx(1.0)


def test_stats_kl_is_the_mean_over_response_tokens():
    logp, old_logp, ref_logp, adv, mask, groups = make_batch(LENGTHS, ADVANTAGES, T, seed=8)
    stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon=0.2, beta=0.04, aggregation="token")[1]
    values = [math.exp(r - p.item()) - (r - p.item()) - 1
              for outputs in groups for o in outputs for p, r in zip(o["logp"], o["ref"])]
    assert stats["kl"].item() == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert stats["response_tokens"].item() == sum(n for group in LENGTHS for n in group)
    assert all(not v.requires_grad for v in stats.values())


def test_arguments_are_checked():
    logp, old_logp, ref_logp, adv, mask, _ = make_batch(LENGTHS, ADVANTAGES, T)
    with pytest.raises(ValueError, match="max_tokens"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon=0.2, beta=0.0, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old_logp, None, adv, mask, epsilon=0.2, beta=0.04, aggregation="sequence")
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask[:, :3], epsilon=0.2, beta=0.0, aggregation="sequence")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old_logp, ref_logp, adv[:3], mask, epsilon=0.2, beta=0.0, aggregation="sequence")
    with pytest.raises(ValueError):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon=0.2, beta=0.0, aggregation="mean")
    # beta = 0 needs no reference model
    loss, stats = grpo_loss(logp, old_logp, None, adv, mask, epsilon=0.2, beta=0.0, aggregation="sequence")
    assert torch.isfinite(loss) and "kl" not in stats


# ---- advantages ---------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    # [1,0,0,1]: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = 1/sqrt(3) -> ±sqrt(3)/2.
    # [1,0,0,0]: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2 -> 3/2 and -1/2.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    h = math.sqrt(3) / 2
    expected = torch.tensor([[h, -h, -h, h], [1.5, -0.5, -0.5, -0.5]], dtype=torch.float64)
    assert torch.allclose(group_advantages(rewards, eps=0.0), expected, atol=1e-12, rtol=0)
    with_eps = group_advantages(rewards)   # TRL's 1e-4 added to std
    assert with_eps[1, 0].item() == pytest.approx(0.75 / (0.5 + 1e-4), abs=1e-12)
    assert group_advantages(torch.tensor([[1, 0, 0, 0]]), eps=0.0).tolist() == [[1.5, -0.5, -0.5, -0.5]]  # ints


def test_identical_groups_get_exact_zeros():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.7, 0.3]])
    for scale_by_std in (True, False):
        for eps in (0.0, 1e-4):
            adv = group_advantages(rewards, scale_by_std=scale_by_std, eps=eps)
            assert torch.equal(adv[:3], torch.zeros(3, 3)) and not adv.isnan().any()
            assert (adv[3] != 0).all()
    single = group_advantages(torch.tensor([[0.7], [0.2]]), eps=0.0)   # G = 1: nothing to compare against
    assert torch.equal(single, torch.zeros(2, 1))


def test_dr_grpo_advantages_skip_the_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [1.0, -1.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(group_advantages(rewards, scale_by_std=False), expected, atol=1e-12, rtol=0)


def test_group_advantages_wants_groups():
    with pytest.raises(ValueError, match="num_groups"):
        group_advantages(torch.zeros(8))


# ---- the k3 estimator ---------------------------------------------------------------------------------------------

def test_k3_is_non_negative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=gen, dtype=torch.float64) * 8
    ref = -torch.rand(1000, generator=gen, dtype=torch.float64) * 8
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all() and (kl > 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    # DeepSeekMath eq. 4 in probabilities: π_ref/π - log(π_ref/π) - 1
    for p, r, value in zip(logp[:20].tolist(), ref[:20].tolist(), kl[:20].tolist()):
        q = math.exp(r) / math.exp(p)
        assert value == pytest.approx(q - math.log(q) - 1, rel=1e-9, abs=1e-12)


def test_presets_name_valid_settings():
    assert PRESETS["deepseekmath"]["beta"] == 0.04 and PRESETS["deepseekmath"]["group_size"] == 64
    assert PRESETS["deepseek_r1_zero"]["beta"] == 0.001 and PRESETS["deepseek_r1_zero"]["group_size"] == 16
    for preset in PRESETS.values():
        Aggregation(preset["aggregation"])
