"""Knowledgeable salient-span training (KSSM, Wang et al., "Knowledgeable Salient Span Mask for Enhancing Language
Models as Knowledge Base") for a causal language model: `SalientSpanLoss`, the loss of knowledge CPT.

The paper continues a masked LM's pretraining with two self-supervised changes; both need to know which tokens are
knowledge-bearing (K-B), found here per micro-batch, without labels (training/data/salient_spans.py): rules on the
detokenised text, plus the tokens this model mispredicts most in this very forward pass.
  1. **Salient-span focus.** The paper masks K-B spans instead of random tokens. A causal model predicts every token
     already, so the equivalent is to weight the prediction of K-B tokens: each K-B label's cross-entropy counts
     (1 + `span_weight`) times, the loss normalised by the summed weights (then scaled to the micro-batch's token
     count, so megatron's per-token averaging over micro-batches and ranks holds).
  2. **Attention to K-B tokens.** The paper raises the attention paid to K-B tokens. Here every layer's attention
     mass from the positions predicting a K-B token onto the earlier K-B tokens is raised
     (training/model/salient_attention.py), with weight `attention_weight`.
Reported beside the objective: the plain next-token loss ("lm loss", comparable with any CPT run), the loss on K-B
labels alone, the attention term and the share of labels marked K-B.
"""
from __future__ import annotations

import contextlib

import torch

from training.data.salient_spans import model_salient, salient_token_mask
from training.model.salient_attention import observe_salient_attention
from training.train.losses import NextTokenLoss


class SalientSpanLoss(NextTokenLoss):
    reported = ("lm loss", "kssm loss", "salient lm loss", "salient attention loss", "salient share")

    def __init__(self, vocabulary, span_weight: float, attention_weight: float, model_fraction: float,
                 decoder_layers: int):
        self.vocabulary, self.span_weight, self.decoder_layers = vocabulary, span_weight, decoder_layers
        self.attention_weight, self.model_fraction = attention_weight, model_fraction
        self.tokenizer = vocabulary.tokenizer
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._pieces[token_id]

    def rule_marks(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[list[str]]]:
        """[b, s + 1] K-B marks by the rules over each row's window (its tokens, then its last label), and the
        window's token texts."""
        window = torch.cat([tokens, labels[:, -1:]], dim=1)
        ids = self.vocabulary.to_ids(window.cpu()) if self.vocabulary.is_subset else window.cpu()
        marks, texts = [], []
        for row in ids.tolist():
            pieces = [self.piece(i) for i in row]
            texts.append(pieces)
            marks.append(salient_token_mask("".join(pieces), pieces))
        return torch.tensor(marks, dtype=torch.bool), texts

    def __call__(self, model, batch: dict, attention_mask=None):
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask = batch["loss_mask"].float()
        rules, texts = self.rule_marks(tokens, labels)
        rules = rules.to(tokens.device)
        observing = (observe_salient_attention(rules[:, :-1], rules[:, 1:]) if self.attention_weight > 0
                     else contextlib.nullcontext([]))
        with observing as terms:
            output = model(tokens, batch["position_ids"], attention_mask, labels=labels, loss_mask=loss_mask)

        def loss_func(per_token_loss):
            nll = per_token_loss.float().view(labels.shape)
            kb = rules[:, 1:].clone()
            if self.model_fraction > 0:   # plus the labels this forward mispredicted most (word tokens only)
                for row in range(nll.shape[0]):
                    extra = model_salient(nll[row].detach().tolist(), texts[row][1:], self.model_fraction)
                    kb[row] |= torch.tensor(extra, device=kb.device)
            kb = kb.float() * loss_mask
            weights = loss_mask + self.span_weight * kb
            count, kb_count = loss_mask.sum(), kb.sum()
            # the attention term of the decoder's layers, which run first (MTP's layer sees the sequence shifted by
            # one token: the marks would be misaligned there)
            layers = terms[:self.decoder_layers]
            attention = torch.stack(layers).mean() if layers else nll.sum() * 0.0
            # the K-B-weighted mean plus the attention term, scaled to this micro-batch's token count (megatron
            # divides the step's summed losses by its summed counts)
            objective = ((nll * weights).sum() / weights.sum().clamp(min=1) + self.attention_weight * attention) * count
            return objective, count.to(torch.int), {
                "lm loss": torch.stack([(nll * loss_mask).sum().detach(), count]),
                "kssm loss": torch.stack([objective.detach(), count]),
                "salient lm loss": torch.stack([(nll * kb).sum().detach(), kb_count]),
                "salient attention loss": torch.stack([attention.detach() * count, count]),
                "salient share": torch.stack([kb_count, count])}

        return output, loss_func

