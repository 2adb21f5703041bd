"""Decoding and scoring with a megatron-core GPTModel in one process: greedy (or sampled) generation and token NLL.

No KV cache: every step re-runs the whole (short) sequence, which is simple and exact, and cheap for the tiny model.
Batches are right-padded: with causal attention a position never sees the padding after it, and MoE routing here
drops no tokens (no capacity factor), so a padded batch gives each prompt exactly the tokens it would get alone.

`GPTModel.forward` always computes logits for every position and, with MTP, insists on labels. Evaluation needs
neither: it projects only the positions it asks for, and skips the MTP block, which DeepSeek-V3 (§2.2) uses as a
training objective only and discards at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from training import tokenizer as T
from training.eval.perplexity import nll_from_logits
from training.vocabulary import vocabulary


def hidden_states(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [seq, batch, hidden] of `tokens` [batch, seq] (the decoder half of GPTModel.forward)."""
    positions = torch.arange(tokens.shape[1], dtype=torch.long, device=tokens.device).unsqueeze(0).expand_as(tokens)
    # megatron-core 0.16.1's own preprocessing (embedding + rotary tables); pinned, so the private call is stable.
    decoder_input, rotary_pos_emb, rotary_cos, rotary_sin, len_offset, padding_mask = \
        gpt._preprocess(input_ids=tokens, position_ids=positions)[:6]
    return gpt.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary_pos_emb,
                       rotary_pos_cos=rotary_cos, rotary_pos_sin=rotary_sin, sequence_len_offset=len_offset,
                       padding_mask=padding_mask)


def project(gpt, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of some hidden rows [..., hidden] -> [..., vocab] (float32)."""
    logits, _ = gpt.output_layer(hidden, runtime_gather_output=True)
    return logits.float()


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    stop_reason: str          # "stop_string", "eod", "max_new_tokens" or "context_full"


class Generator:
    """Generates from token-id prompts with a loaded GPTModel (see training.model.release.load_release)."""

    def __init__(self, gpt, max_positions: int, batch_size: int = 8, vocab_merges: int | None = None):
        self.gpt, self.max_positions, self.batch_size = gpt, max_positions, batch_size
        self.device = next(gpt.parameters()).device      # inputs follow the weights (CPU here, a GPU elsewhere)
        # Prompts and outputs are DeepSeek token ids; a vocabulary-subset model (model.vocab_merges) sees rows.
        self.vocabulary = vocabulary(vocab_merges)
        self.tok = self.vocabulary.tokenizer
        self.pad_id, self.eod_id = T.token_id(T.PAD), T.eod_id()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[Generation]:
        """Continue each prompt; temperature 0 is greedy. Output text is cut at the first stop string."""
        rng = torch.Generator().manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[start:start + self.batch_size], max_new_tokens, stop, temperature, rng)
        return out

    def _batch(self, prompts, max_new_tokens, stop, temperature, rng) -> list[Generation]:
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            if len(p) >= self.max_positions:
                raise ValueError(f"prompt of {len(p)} tokens leaves no room under max_position_embeddings "
                                 f"{self.max_positions}")
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        reason: list[str | None] = [None] * len(prompts)
        for _ in range(max_new_tokens):
            live = [i for i, r in enumerate(reason) if r is None]
            if not live:
                break
            width = max(len(seqs[i]) for i in live)
            batch = torch.full((len(live), width), self.pad_id, dtype=torch.long)
            for row, i in enumerate(live):
                batch[row, :len(seqs[i])] = torch.tensor(seqs[i])
            hidden = hidden_states(self.gpt, self.vocabulary.to_rows(batch.to(self.device)))   # [seq, batch, h]
            last = torch.stack([hidden[len(seqs[i]) - 1, row] for row, i in enumerate(live)])
            logits = self._logits(last)                                   # [batch, rows]
            nxt = self.vocabulary.to_ids(_pick(logits.cpu(), temperature, rng))
            for row, i in enumerate(live):
                token = int(nxt[row])
                if token == self.eod_id:
                    reason[i] = "eod"
                    continue
                seqs[i].append(token)
                new[i].append(token)
                if stop and any(s in self.decode(new[i]) for s in stop):
                    reason[i] = "stop_string"
                elif len(seqs[i]) >= self.max_positions:
                    reason[i] = "context_full"
        results = []
        for i in range(len(prompts)):
            text = self.decode(new[i])
            results.append(Generation(text=cut_at_stop(text, stop), token_ids=new[i],
                                      stop_reason=reason[i] or "max_new_tokens"))
        return results

    @torch.no_grad()
    def token_nll(self, tokens: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Per-position NLL [batch, seq-1] of tokens[:, 1:] given the prefix (float64 for a stable sum)."""
        tokens = self.vocabulary.to_rows(tokens.to(self.device))
        hidden = hidden_states(self.gpt, tokens)                          # [seq, batch, h]
        targets = tokens[:, 1:].t()                                      # [seq-1, batch]
        parts = []
        for s in range(0, targets.shape[0], chunk):                      # bounds the [chunk, batch, vocab] logits
            logits = self._logits(hidden[s:min(s + chunk, targets.shape[0])])
            parts.append(nll_from_logits(logits, targets[s:s + chunk]))
        return torch.cat(parts).t().cpu()


    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`project`, with the padding rows of a vocabulary subset (rows no token maps to) never chosen or scored."""
        logits = project(self.gpt, hidden)
        if self.vocabulary.is_subset:
            logits[..., self.vocabulary.rows:] = float("-inf")
        return logits


def _pick(logits: torch.Tensor, temperature: float, rng: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]
