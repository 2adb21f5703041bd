"""CAP's contrastive terms (Xu et al., "From Dense to Sparse: Contrastive Pruning for Better Pre-trained Language
Model Compression", AAAI 2022; issue 20's `compress` stage): while a model is pruned, its sequence representations
are pulled toward other models' representations of the same inputs and pushed from those of other inputs.

  - **PrC** contrasts with the pre-trained model (task-agnostic knowledge), **FiC** with the fine-tuned model
    (task-specific knowledge), **SnC** with the pruning snapshots (the model at earlier sparsities).
  - Each term is the sum of two losses over the same scores: *unsupervised*, whose positives are the same input's
    representations, and *supervised*, whose positives are every representation with the same label (here: the
    task of a task-suite item). As in the authors' code, the current batch's own representations (detached) join
    the candidates, and the anchor itself is excluded.

A sequence's representation is the mean of its final hidden states over its tokens, L2-normalised (the authors'
"mean-pooling" option; a causal model has no [CLS] token). Scores are cosine similarities over a temperature τ:

    p(i, c) = exp(z_i · c / τ) / Σ_{c' ∈ C, c' ≠ z_i} exp(z_i · c' / τ)
    L = -1/|A| Σ_{i ∈ A} 1/|P(i)| Σ_{c ∈ P(i)} log p(i, c)      (A: anchors with a positive and a negative)

An anchor whose every candidate is a positive is left out: it has nothing to contrast, and its loss would only pull
it toward every candidate alike (the supervised term when all inputs share one task; the authors' classification
tasks always have two labels or more).

The authors' code divides the summed, per-anchor-normalised log-probabilities by the number of positive pairs
instead of by the number of anchors; the mean over anchors here weighs every anchor once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The authors' settings (their run scripts, github.com/RunxinXu/ContrastivePruning, run_glue.sh): τ = 0.1; unsupervised
# and supervised weights 0.3 and 3 for structured pruning (0.1 and 10 for unstructured); 4096 extra negatives.
TEMPERATURE = 0.1
UNSUPERVISED_WEIGHT, SUPERVISED_WEIGHT = 0.3, 3.0


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of `hidden` [batch, seq, h] over the positions where `mask` [batch, seq] is 1."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(mean.float(), dim=-1)


def contrastive_losses(anchors: torch.Tensor, anchor_ids: torch.Tensor, anchor_labels: torch.Tensor,
                       references: torch.Tensor, reference_ids: torch.Tensor, reference_labels: torch.Tensor,
                       temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsupervised, supervised) contrastive losses of `anchors` [n, d] (the pruned model's representations of
    inputs `anchor_ids`, labels `anchor_labels`) against `references` [m, d] (another model's representations of
    inputs `reference_ids`: the batch's own, and extra inputs as negatives), both L2-normalised."""
    candidates = torch.cat([anchors.detach(), references])
    ids = torch.cat([anchor_ids, reference_ids])
    labels = torch.cat([anchor_labels, reference_labels])
    n = anchors.shape[0]
    itself = torch.zeros(n, candidates.shape[0], dtype=torch.bool, device=anchors.device)
    itself[:, :n] = torch.eye(n, dtype=torch.bool, device=anchors.device)
    scores = (anchors @ candidates.t()) / temperature
    log_p = scores.masked_fill(itself, float("-inf")).log_softmax(-1)

    def loss(positive: torch.Tensor) -> torch.Tensor:
        positive = positive & ~itself
        count = positive.sum(-1)
        has = (count > 0) & (count < (~itself).sum(-1))   # a positive, and a negative to contrast it with
        if not bool(has.any()):
            return scores.sum() * 0.0
        per_anchor = log_p.masked_fill(~positive, 0.0).sum(-1)[has] / count[has]
        return -per_anchor.mean()

    return (loss(anchor_ids[:, None] == ids[None, :]), loss(anchor_labels[:, None] == labels[None, :]))
