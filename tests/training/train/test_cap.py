"""CAP's pieces (issue 20's compress stage): the contrastive losses against a direct transcription of their equations
on fixed tensors (training/train/contrastive.py), masks that reach the configured sparsity exactly, schedules, and
pruned weights that stay zero through optimizer steps (training/train/pruning.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.train.contrastive import contrastive_losses, pooled
from training.train.pruning import (apply_masks, cubic_sparsity, lowest, neuron_masks, sparsity_of, stepped_sparsity,
                                    unstructured_masks)


def transcription(anchors, anchor_ids, anchor_labels, refs, ref_ids, ref_labels, tau):
    """The equations, one anchor and one candidate at a time, in float64."""
    cands = [(a.detach(), i, l) for a, i, l in zip(anchors, anchor_ids.tolist(), anchor_labels.tolist())]
    cands += list(zip(refs, ref_ids.tolist(), ref_labels.tolist()))
    results = []
    for same in ("id", "label"):
        per_anchor = []
        for n, (z, i, l) in enumerate(zip(anchors.double(), anchor_ids.tolist(), anchor_labels.tolist())):
            others = [(c.double(), ci, cl) for k, (c, ci, cl) in enumerate(cands) if k != n]   # not itself
            denominator = sum(math.exp(float(z @ c) / tau) for c, _, _ in others)
            positives = [c for c, ci, cl in others if (ci == i if same == "id" else cl == l)]
            if positives:
                per_anchor.append(-sum(math.log(math.exp(float(z @ c) / tau) / denominator) for c in positives)
                                  / len(positives))
        results.append(sum(per_anchor) / len(per_anchor))
    return results


def test_contrastive_losses_equal_the_equations():
    g = torch.Generator().manual_seed(0)
    anchors = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
    refs = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    anchor_ids, anchor_labels = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 6, 9])   # label 9: no other
    ref_ids, ref_labels = torch.tensor([0, 1, 2, 3, 10, 11, 12]), torch.tensor([5, 5, 6, 9, 6, 5, 7])
    unsup, sup = contrastive_losses(anchors, anchor_ids, anchor_labels, refs, ref_ids, ref_labels, 0.1)
    expected = transcription(anchors, anchor_ids, anchor_labels, refs, ref_ids, ref_labels, 0.1)
    assert abs(unsup.item() - expected[0]) < 1e-5 and abs(sup.item() - expected[1]) < 1e-5, (unsup, sup, expected)
    (unsup + sup).backward()
    assert anchors.grad.abs().sum() > 0   # the pruned model's side learns; the references are constants


def test_pooled_is_the_normalised_mean_over_the_masked_positions():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, 2]])
    assert torch.allclose(pooled(hidden, mask), F.normalize(expected, dim=-1))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_masks_reach_the_configured_sparsity_exactly(sparsity):
    g = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(64, 48, generator=g), "b": torch.randn(10, 7, generator=g)}
    weights["a"][:4] = 0.25   # ties: still exactly the count asked for
    masks = unstructured_masks(weights, sparsity)
    for name, w in weights.items():
        assert int((~masks[name]).sum()) == round(sparsity * w.numel())
        if 0 < sparsity:
            assert w[~masks[name]].abs().max() <= w[masks[name]].abs().min()   # the smallest went
    movement = {name: torch.randn(w.shape, generator=g) for name, w in weights.items()}
    by_movement = unstructured_masks(weights, sparsity, movement)
    assert all(int((~m).sum()) == round(sparsity * weights[n].numel()) for n, m in by_movement.items())
    fc1, fc2 = torch.randn(2 * 24, 16, generator=g), torch.randn(16, 24, generator=g)
    keep1, keep2 = neuron_masks(fc1, fc2, sparsity)
    pruned_neurons = (~keep2[0]).nonzero().view(-1)
    assert len(pruned_neurons) == round(sparsity * 24)
    for neuron in pruned_neurons:   # a neuron goes whole: its gate row, its up row and its fc2 column
        assert not keep1[neuron].any() and not keep1[24 + neuron].any() and not keep2[:, neuron].any()
    assert int((~keep1).sum()) == 2 * 16 * len(pruned_neurons)


def test_schedules():
    assert cubic_sparsity(0, 100, 0.9, warmup=10) == 0.0 and cubic_sparsity(10, 100, 0.9, warmup=10) == 0.0
    assert cubic_sparsity(90, 100, 0.9, warmup=10, cooldown=10) == pytest.approx(0.9)
    assert cubic_sparsity(100, 100, 0.9) == pytest.approx(0.9)
    values = [cubic_sparsity(s, 100, 0.9, warmup=10, cooldown=10) for s in range(101)]
    assert values == sorted(values) and values[30] > 0.9 * (1 - (1 - 20 / 80) ** 3) - 1e-9
    assert [stepped_sparsity(s, 90, 0.9) for s in (0, 9, 10, 89)] == pytest.approx([0.1, 0.1, 0.2, 0.9])
    with pytest.raises(ValueError, match="sparsities must satisfy"):
        cubic_sparsity(0, 10, 1.0)


def test_pruned_weights_stay_zero_through_optimizer_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):   # dense steps first: Adam's moments are non-zero everywhere when pruning starts
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    weights = {n: p for n, p in params.items() if n.endswith("weight")}
    masks = unstructured_masks({n: p.detach() for n, p in weights.items()}, 0.9)
    apply_masks(params, masks)
    before = {n: p.detach().clone() for n, p in weights.items()}
    for _ in range(20):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        apply_masks(params, masks, gradients=True)
        optimizer.step()
        apply_masks(params, masks)
    for name, kept in masks.items():
        assert torch.all(weights[name][~kept] == 0), name
        assert not torch.equal(weights[name][kept], before[name][kept])   # the rest kept training
    assert sparsity_of(weights.values()) == pytest.approx(0.9, abs=1e-3)
    assert lowest(torch.tensor([3.0, 1.0, 2.0]), 1 / 3).tolist() == [True, False, True]
