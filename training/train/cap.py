"""The compress stage's loss: the task loss plus CAP's contrastive terms (training/train/contrastive.py holds the
equations), against banks of representations computed before or during training.

As in the authors' code (StructuredPruning/run_glue.py), the other models are not run in the training loop: each one
represents every training input once, into a bank indexed by the input's id.
  - PrC's bank: the pre-trained model's representations, [inputs, 1, d].
  - FiC's bank: the fine-tuned model's, [inputs, 1, d].
  - SnC's bank: the pruned model's own, taken at each mask update after the first (`RepresentationBanks.snapshot`),
    the most recent `max_snapshots` kept, [inputs, k, d].
For a micro-batch, each term contrasts the pruned model's representations with, per input, its bank entries (plus the
micro-batch's own representations, detached) and `extra_examples / k` other inputs' entries drawn at random.
Positives: the same input (unsupervised), or the same task (supervised).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from training.train.contrastive import contrastive_losses, pooled
from training.train.losses import NextTokenLoss

TERMS = ("prc", "fic", "snc")


@contextmanager
def final_hidden(model):
    """Yields a list that holds, after a forward pass of `model` (a GPT module, wrapped or not), the decoder's final
    hidden states [s, b, h]: the input of the first output-layer call (MTP's later calls are ignored)."""
    from megatron.core.utils import get_attr_wrapped_model

    seen: list[torch.Tensor] = []

    def capture(_module, args):
        if not seen:
            seen.append(args[0])

    handle = get_attr_wrapped_model(model, "output_layer").register_forward_pre_hook(capture)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def represent(model, rows, batch_size: int, device: torch.device, to_rows=None) -> torch.Tensor:
    """[len(rows), d] L2-normalised mean final hidden states of every row of `rows` (a dataset of the compress
    stage's rows, in id order) under `model`; `to_rows`: the vocabulary's id -> embedding-row map, if a subset."""
    out = []
    for start in range(0, len(rows), batch_size):
        items = [rows.by_id(i) for i in range(start, min(start + batch_size, len(rows)))]
        tokens = torch.stack([torch.as_tensor(item["tokens"]) for item in items]).to(device)
        positions = torch.stack([torch.as_tensor(item["position_ids"]) for item in items]).to(device)
        valid = torch.stack([torch.as_tensor(item["valid"]) for item in items]).to(device)
        tokens = to_rows(tokens) if to_rows else tokens
        with final_hidden(model) as seen:   # labels: megatron's MTP needs some (its loss is not used)
            model(tokens, positions, None, labels=tokens, loss_mask=valid)
        out.append(pooled(seen[0].transpose(0, 1), valid).cpu())
    return torch.cat(out)


class RepresentationBanks:
    """The three banks and every input's label (its task's index), on the CPU."""

    def __init__(self, pretrained: torch.Tensor | None, fine_tuned: torch.Tensor | None, labels: torch.Tensor,
                 max_snapshots: int):
        self.banks: dict[str, torch.Tensor | None] = {
            "prc": None if pretrained is None else pretrained[:, None],
            "fic": None if fine_tuned is None else fine_tuned[:, None], "snc": None}
        self.labels, self.max_snapshots = labels, max_snapshots
        self.snapshot_steps: list[int] = []

    def snapshot(self, representations: torch.Tensor, step: int) -> None:
        """Add the pruned model's representations at `step` to SnC's bank (dropping the oldest beyond the limit)."""
        old = self.banks["snc"]
        bank = representations[:, None] if old is None else torch.cat([old, representations[:, None]], dim=1)
        self.banks["snc"] = bank[:, -self.max_snapshots:]
        self.snapshot_steps = (self.snapshot_steps + [step])[-self.max_snapshots:]


class ContrastivePruningLoss(NextTokenLoss):
    """`ce_weight` x the replies' next-token loss + Σ weight_t x (U x unsupervised_t + S x supervised_t) over the
    terms t with a bank. The batch carries each row's input id (`example`), task (`label`) and real-token mask
    (`valid`), constant or per position along the sequence."""

    reported = ("cap loss", "lm loss", "prc loss", "fic loss", "snc loss")

    def __init__(self, banks: RepresentationBanks, contrastive, ce_weight: float, seed: int):
        self.banks, self.cfg, self.ce_weight, self.seed = banks, contrastive, ce_weight, seed
        self.weights = {"prc": contrastive.prc_weight, "fic": contrastive.fic_weight, "snc": contrastive.snc_weight}
        self.step, self.micro_batch = 0, 0   # the extra examples' draw: set by the Pruner before each step

    def at_step(self, step: int) -> None:
        self.step, self.micro_batch = step, 0

    def extra(self, bank: torch.Tensor, term: str) -> torch.Tensor:
        """Ids of the other inputs drawn for this micro-batch (a pure function of seed, step, micro-batch, term: a
        resumed run draws the same)."""
        count = min(self.cfg.extra_examples // bank.shape[1], bank.shape[0])
        generator = torch.Generator().manual_seed(   # a tuple of ints hashes the same in every process
            hash((self.seed, self.step, self.micro_batch, TERMS.index(term))) % 2 ** 63)
        return torch.randperm(bank.shape[0], generator=generator)[:count]

    def term(self, name: str, anchors: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bank = self.banks.banks[name]
        k = bank.shape[1]
        extra = self.extra(bank, name)
        chosen = torch.cat([ids.cpu(), extra])
        references = bank[chosen].reshape(-1, bank.shape[-1]).to(anchors.device)
        reference_ids = chosen.repeat_interleave(k).to(anchors.device)
        reference_labels = self.banks.labels[chosen].repeat_interleave(k).to(anchors.device)
        unsupervised, supervised = contrastive_losses(anchors, ids, labels, references, reference_ids,
                                                      reference_labels, self.cfg.temperature)
        return self.cfg.unsupervised_weight * unsupervised + self.cfg.supervised_weight * supervised

    def __call__(self, model, batch: dict, attention_mask=None):
        loss_mask = batch["loss_mask"].float()
        ids, labels = batch["example"][:, 0], batch["label"][:, 0]
        with final_hidden(model) as seen:
            output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                           loss_mask=loss_mask)
        anchors = pooled(seen[0].transpose(0, 1), batch["valid"])
        self.micro_batch += 1

        def loss_func(per_token_loss):
            nll = (per_token_loss.float().view(loss_mask.shape) * loss_mask).sum()
            count = loss_mask.sum()
            terms = {name: self.term(name, anchors, ids, labels) if self.weights[name] > 0
                     and self.banks.banks[name] is not None else anchors.sum() * 0.0 for name in TERMS}
            contrastive = sum(self.weights[name] * value for name, value in terms.items())
            # scaled to the micro-batch's token count: megatron divides the step's summed losses by summed counts
            objective = (self.ce_weight * nll / count.clamp(min=1) + contrastive) * count
            return objective, count.to(torch.int), {
                "cap loss": torch.stack([objective.detach(), count]), "lm loss": torch.stack([nll.detach(), count]),
                **{f"{name} loss": torch.stack([value.detach() * count, count]) for name, value in terms.items()}}

        return output, loss_func
