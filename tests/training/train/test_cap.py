"""CAP's pieces (issue 20's compress stage): the contrastive losses against a direct transcription of their equations
on fixed tensors (training/train/contrastive.py), masks that reach the configured sparsity exactly, schedules, and
pruned weights that stay zero through optimizer steps (training/train/pruning.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.train.contrastive import contrastive_losses, pooled
from training.config.compress import PruningConfig
from training.train.pruner import scheduled_sparsity
from training.train.pruning import (apply_masks, cubic_sparsity, lowest, model_masks, neuron_masks, sparsity_of,
                                    stepped_sparsity, unstructured_masks)


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


def test_an_anchor_with_nothing_to_contrast_is_left_out():
    """One task: every candidate shares the anchors' label, so the supervised loss has no negative and contributes
    nothing (and no gradient); the unsupervised one still contrasts inputs."""
    g = torch.Generator().manual_seed(2)
    anchors = F.normalize(torch.randn(3, 8, generator=g), dim=-1).requires_grad_()
    refs = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    same = torch.zeros(3, dtype=torch.long)
    unsup, sup = contrastive_losses(anchors, torch.arange(3), same, refs, torch.tensor([0, 1, 2, 7, 8]),
                                    torch.zeros(5, dtype=torch.long), 0.1)
    assert sup.item() == 0.0 and unsup.item() > 0
    sup.backward()
    assert anchors.grad is None or not anchors.grad.any()


def _megatron_named(heads=4, qk=24, kv=32, v=16, hidden=64, ffn=48, experts=2):
    """Random weights under megatron's names for one MLA + MoE layer (the shapes of the micro model's)."""
    g = torch.Generator().manual_seed(3)
    shapes = {"self_attention.linear_q_down_proj.weight": (32, hidden),
              "self_attention.linear_q_up_proj.weight": (heads * qk, 32),
              "self_attention.linear_kv_down_proj.weight": (40, hidden),
              "self_attention.linear_kv_up_proj.weight": (heads * kv, 32),
              "self_attention.linear_proj.weight": (hidden, heads * v),
              "mlp.router.weight": (experts, hidden), "input_layernorm.weight": (hidden,),
              "mlp.shared_experts.linear_fc1.weight": (2 * ffn, hidden),
              "mlp.shared_experts.linear_fc2.weight": (hidden, ffn)}
    for e in range(experts):
        shapes[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * ffn, hidden)
        shapes[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (hidden, ffn)
    named = {f"decoder.layers.1.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    named["embedding.word_embeddings.weight"] = torch.randn(100, hidden, generator=g)
    named["mtp.layers.0.transformer_layer.mlp.linear_fc1.weight"] = torch.randn(2 * ffn, hidden, generator=g)
    return named


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_model_masks_prune_the_decoders_matrices_exactly(sparsity):
    named = _megatron_named()
    unstructured = model_masks(named, "unstructured", sparsity, heads=4)
    assert not any(n.startswith(("embedding", "mtp")) or ".router." in n or "layernorm" in n for n in unstructured)
    assert len(unstructured) == 11   # 5 attention projections, the shared expert's 2, two routed experts' 4
    assert all(int((~m).sum()) == round(sparsity * m.numel()) for m in unstructured.values())

    structured = model_masks(named, "structured", sparsity, heads=4)
    block = "decoder.layers.1.self_attention."
    kept_heads = structured[block + "linear_proj.weight"][0].view(4, 16)[:, 0]
    assert int((~kept_heads).sum()) == min(round(sparsity * 4), 3)   # at least one head per layer stays
    for head in range(4):   # a head goes whole: its query rows, its key and value rows, its output columns
        for name, rows in (("linear_q_up_proj.weight", 24), ("linear_kv_up_proj.weight", 32)):
            assert structured[block + name][head * rows:(head + 1) * rows].eq(kept_heads[head]).all()
        assert structured[block + "linear_proj.weight"][:, head * 16:(head + 1) * 16].eq(kept_heads[head]).all()
    assert block + "linear_q_down_proj.weight" not in structured   # shared by every head
    for expert in ("mlp.shared_experts.", "mlp.experts.local_experts.0.", "mlp.experts.local_experts.1."):
        fc2 = structured[f"decoder.layers.1.{expert}linear_fc2.weight"]
        assert int((~fc2[0]).sum()) == round(sparsity * 48)


def test_structured_pruning_needs_multi_latent_attention():
    named = {"decoder.layers.0.self_attention.linear_proj.weight": torch.randn(8, 8),
             "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(24, 8)}
    with pytest.raises(ValueError, match="not MLA"):
        model_masks(named, "structured", 0.5, heads=2)


def test_the_stage_schedule_steps_as_cap_does():
    stepped = PruningConfig(sparsity=0.9, stages=9)
    assert [scheduled_sparsity(stepped, s, 90) for s in (0, 9, 10, 89)] == pytest.approx([0.1, 0.1, 0.2, 0.9])
    cubic = PruningConfig(sparsity=0.9, schedule="cubic", interval=10, cooldown_steps=20)
    values = [scheduled_sparsity(cubic, s, 100) for s in range(100)]
    assert len(set(values[:80])) == 8 and values[0] == 0.0 and values[80:] == [pytest.approx(0.9)] * 20
    assert values[10:20] == [values[10]] * 10   # held between updates
