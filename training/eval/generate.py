"""Decoding and scoring with a megatron-core GPTModel in one process: batched generation (greedy, or sampled with
temperature and top-p; stop strings, stop tokens, a budget of new tokens) and token NLL.

Generation decodes through megatron-core's KV cache by default (`training/eval/kv_cache.py`): the prompts are
prefilled once and each step then runs one new position per row. `use_cache=False` is the reference: every step
re-runs the whole right-padded sequence (with causal attention a position never sees the padding after it, and MoE
routing here drops no tokens, so a padded batch gives each prompt exactly the tokens it would get alone). Greedy
decoding gives the same tokens either way. Prompts are batched in order of length (results come back in the caller's
order): with the cache, a batch steps through the part of its longer prompts past its shortest one position at a time.

Sampling (temperature > 0): temperature, then the nucleus (top-p, Holtzman et al. 2019: the most likely tokens
whose probabilities sum to at least p), then one uniform draw per new token from the prompt's own random stream,
derived from `seed` and its index in the call. A prompt's sample therefore depends neither on the rest of its batch
nor on the batch size, and is the same with and without the cache wherever the two give the same probabilities.

`GPTModel.forward` always computes logits for every position and, with MTP, insists on labels. Evaluation needs
neither: it projects only the positions it asks for, and skips the MTP block, which DeepSeek-V3 (§2.2) uses as a
training objective only and discards at inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from training import tokenizer as T
from training.parallel.patches import cpu_device
from training.eval.kv_cache import KVCache, hidden_states
from training.eval.model_parallel import ModelParallelForward
from training.eval.perplexity import nll_from_logits
from training.vocabulary import vocabulary

__all__ = ["Generation", "Generator", "cut_at_stop", "hidden_states", "nucleus", "project", "sample"]


def project(gpt, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of some hidden rows [..., hidden] -> [..., vocab] (float32)."""
    logits, _ = gpt.output_layer(hidden, runtime_gather_output=True)
    return logits.float()


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    stop_reason: str          # "stop_string", "stop_token", "eod", "max_new_tokens" or "context_full"
    stop_token_id: int | None = None   # the token that ended it ("eod", "stop_token"); not in token_ids or text


@dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    temperature: float
    top_p: float


@dataclass
class _Row:
    """One prompt's decoding state: its tokens so far (DeepSeek ids), the new ones, and why it ended."""
    seq: list[int]
    rng: torch.Generator
    new: list[int] = field(default_factory=list)
    reason: str | None = None
    stop_token_id: int | None = None


def row_seeds(seed: int, count: int) -> list[int]:
    """The random-stream seeds of the rows of a `count`-prompt `generate` call with `seed`."""
    return torch.randint(2 ** 62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


class Generator:
    """Generates from token-id prompts with a loaded GPTModel in eval mode (see training.model.release.load_release)."""

    def __init__(self, gpt, max_positions: int, batch_size: int = 8, vocab_merges: int | None = None,
                 model_parallel: bool = False):
        self.gpt, self.max_positions, self.batch_size = gpt, max_positions, batch_size
        self.device = next(gpt.parameters()).device      # inputs follow the weights (CPU here, a GPU elsewhere)
        # `gpt` is this rank's shard of a pipeline/expert-parallel model: its forwards span the ranks
        # (model_parallel.py); every rank of the model calls generate and token_nll alike, with the same row counts.
        self.shards = ModelParallelForward(gpt) if model_parallel else None
        # Prompts and outputs are DeepSeek token ids; a vocabulary-subset model (model.vocab_merges) sees rows.
        self.vocabulary = vocabulary(vocab_merges)
        self.tok = self.vocabulary.tokenizer
        self.pad_id, self.eod_id = T.token_id(T.PAD), T.eod_id()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @torch.inference_mode()   # no autograd bookkeeping at all: the outputs are token ids
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                 use_cache: bool = True, seeds: Sequence[int] | None = None) -> list[Generation]:
        """Continue each prompt by at most `max_new_tokens`; temperature 0 is greedy (`top_p` and `seed` then do
        nothing). A row ends at EOD, at any of `stop_token_ids` (neither is kept in its output), once its new text
        holds a stop string (the text is cut before it; `token_ids` keep the tokens that completed it), or when the
        model's context is full. `use_cache=False`: the uncached reference path. `seeds`: each prompt's stream seed,
        in place of those drawn from `seed` (a slice of `row_seeds(seed, n)` samples those rows of an n-prompt
        call, as a data-parallel rank of a rollout does)."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got {max_new_tokens}, "
                             f"{temperature}, {top_p}")
        settings = _Settings(max_new_tokens, tuple(s for s in stop if s), frozenset(int(t) for t in stop_token_ids),
                             temperature, top_p)
        checked = [self._checked(p) for p in prompts]
        seeds = list(seeds) if seeds is not None else row_seeds(seed, len(prompts))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if self.shards and not use_cache:
            raise ValueError("a model-parallel Generator decodes through the KV cache only (use_cache=True)")
        # Batches of similar lengths: a cached batch steps through its longer prompts one position at a time.
        order = sorted(range(len(prompts)), key=lambda i: len(checked[i]))
        out: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [_Row(checked[i], torch.Generator().manual_seed(seeds[i])) for i in batch]
            if max_new_tokens:
                with cpu_device.suspended():   # decoding creates no "cuda" tensors; the CPU shim's mode costs ~40%
                    (self._decode_cached if use_cache else self._decode_uncached)(rows, settings)
            for i, r in zip(batch, rows):
                out[i] = Generation(text=cut_at_stop(self.decode(r.new), settings.stop), token_ids=r.new,
                                    stop_reason=r.reason or "max_new_tokens", stop_token_id=r.stop_token_id)
        return out

    def _checked(self, prompt: Sequence[int]) -> list[int]:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_positions:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_position_embeddings "
                             f"{self.max_positions}")
        return [int(t) for t in prompt]

    def _decode_uncached(self, rows: list[_Row], settings: _Settings) -> None:
        """Every step re-runs each live row's whole sequence, right-padded."""
        while live := [r for r in rows if r.reason is None]:
            lengths = torch.tensor([len(r.seq) for r in live])
            batch = torch.full((len(live), int(lengths.max())), self.pad_id, dtype=torch.long)
            for i, r in enumerate(live):
                batch[i, :len(r.seq)] = torch.tensor(r.seq)
            hidden = hidden_states(self.gpt, self._to_rows(batch))                    # [seq, batch, h]
            last = (lengths - 1).to(hidden.device), torch.arange(len(live), device=hidden.device)
            self._take(live, hidden[last], settings)

    def _decode_cached(self, rows: list[_Row], settings: _Settings) -> None:
        """Megatron's static-batching schedule (kv_cache.py): prefill to the shortest prompt, then one position per
        step; a row inside its prompt is fed its prompt's next token, a row past it the token it just took. Rows
        that end leave the cache. Model-parallel: every step is a forward across the ranks (model_parallel.py)."""
        longest = max(len(r.seq) for r in rows)
        cache = KVCache(self.gpt, len(rows), min(self.max_positions, longest + settings.max_new_tokens),
                        forward=self.shards.forward if self.shards else None)
        start = min(len(r.seq) for r in rows)
        live = rows
        hidden = cache.step(self._to_rows(torch.tensor([r.seq[:start] for r in live])))   # [batch, h]
        while True:
            ready = [i for i, r in enumerate(live) if len(r.seq) == cache.length]   # past their prompt
            if ready:
                self._take([live[i] for i in ready], None if hidden is None else hidden[ready], settings)
            keep = [i for i, r in enumerate(live) if r.reason is None]
            if self.shards and not keep:   # expert-parallel lockstep: idle until every rank's rows have ended
                while self.shards.any_live(False):
                    self.shards.idle(self.pad_id, self._to_rows)
                return
            if not keep:
                return
            if self.shards:
                self.shards.any_live(True)   # (this rank's answer: its rows are live, so is the step)
            if len(keep) < len(live):
                cache.keep(keep)
                live = [live[i] for i in keep]
            hidden = cache.step(self._to_rows(torch.tensor([[r.seq[cache.length]] for r in live])))

    def _to_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vocabulary.to_rows(ids.to(self.device))

    def _take(self, rows: list[_Row], hidden: torch.Tensor, settings: _Settings) -> None:
        """Choose each row's next token from its last hidden state [rows, h] (None on a pipeline stage before the
        last: the last one's logits are broadcast) and apply the stopping rules."""
        logits = (self.shards.from_last_stage(lambda: self._logits(hidden)) if self.shards
                  else self._logits(hidden)).cpu()
        uniforms = (torch.cat([torch.rand(1, generator=r.rng) for r in rows]) if settings.temperature > 0
                    else None)
        tokens = self.vocabulary.to_ids(sample(logits, settings.temperature, settings.top_p, uniforms))
        for r, token in zip(rows, tokens.tolist()):
            if token == self.eod_id or token in settings.stop_token_ids:
                r.reason, r.stop_token_id = ("eod" if token == self.eod_id else "stop_token"), token
                continue
            r.seq.append(token)
            r.new.append(token)
            if settings.stop and any(s in self.decode(r.new) for s in settings.stop):
                r.reason = "stop_string"
            elif len(r.seq) >= self.max_positions:
                r.reason = "context_full"
            elif len(r.new) >= settings.max_new_tokens:
                r.reason = "max_new_tokens"

    @torch.no_grad()
    def token_nll(self, tokens: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Per-position NLL [batch, seq-1] of tokens[:, 1:] given the prefix (float64 for a stable sum)."""
        tokens = self._to_rows(tokens)
        if self.shards:   # computed on the last pipeline stage, the same values on every stage
            hidden = self.shards.forward(tokens)
            return self.shards.from_last_stage(lambda: self._nll(hidden, tokens, chunk)).cpu()
        return self._nll(hidden_states(self.gpt, tokens), tokens, chunk).cpu()

    def _nll(self, hidden: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
        """[batch, seq-1] NLLs of tokens[:, 1:] from the final hidden states [seq, batch, h]."""
        targets = tokens[:, 1:].t()                                      # [seq-1, batch]
        parts = []
        for s in range(0, targets.shape[0], chunk):                      # bounds the [chunk, batch, vocab] logits
            logits = self._logits(hidden[s:min(s + chunk, targets.shape[0])])
            parts.append(nll_from_logits(logits, targets[s:s + chunk]))
        return torch.cat(parts).t()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`project`, with the padding rows of a vocabulary subset (rows no token maps to) never chosen or scored."""
        logits = project(self.gpt, hidden)
        if self.vocabulary.is_subset:
            logits[..., self.vocabulary.rows:] = float("-inf")
        return logits


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` [..., vocab] with every token outside the nucleus zeroed (not renormalised): the most likely tokens,
    each kept while the tokens more likely than it sum to less than `top_p` (so the most likely is always kept)."""
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = (ordered.cumsum(dim=-1) - ordered) >= top_p
    return probs.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), 0.0)


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Token per row of `logits` [rows, vocab]: the argmax at temperature 0; otherwise the inverse CDF at
    `uniforms` [rows] (each in [0, 1); default: drawn from torch's global generator) of softmax(logits / temperature),
    restricted to the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0])
    cdf = nucleus(torch.softmax(logits.float() / temperature, dim=-1), top_p).cumsum(dim=-1)
    targets = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    # right=True: the first token whose CDF exceeds the draw, so never one of probability 0
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]
