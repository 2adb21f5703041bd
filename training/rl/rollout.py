"""GRPO's rollout phase: G sampled completions per prompt from the policy itself, scored by rule-based rewards, with
group-relative advantages and the sampling policy's per-token log-probs, laid out for the policy update's forward.

One GRPO step (DeepSeekMath §4.1.2, Algorithm 1; DeepSeek-R1 §2.2): for each question q, sample G outputs from
π_θold, reward them, Â_i = (r_i - mean(r)) / std(r) within the group (`grpo_loss.group_advantages`), then update θ
on them. π_θold is the policy module itself at rollout time: `collect` puts it in eval mode (megatron's inference
path and KV cache), samples and scores without autograd, and restores its mode; there is no second copy of the
weights. The Generator must therefore wrap the policy's own unwrapped GPTModel (the train module's `chunks[0]`, one
pipeline stage), and since it holds no weights of its own it is built once per run.

Layout of a `Rollout` (N = num_groups x G rows, sample k of group g at row g * G + k; everything on the CPU):
    tokens         [N, T]    DeepSeek token ids (not model rows): prompt, response, then the closing end-of-sentence
                             token when the model produced it; right-padded with PAD. The train step maps ids to
                             rows as `GPTTrainModule.forward_step` does (`vocabulary.batch_to_rows`).
    response_mask  [N, T-1]  bool, aligned with next-token labels = tokens[:, 1:]: mask[i, t] says whether
                             tokens[i, t+1] is a response token. It covers exactly the generated tokens plus the EOS
                             that closed them; a response cut off (max_new_tokens, context_full) has no EOS and is
                             covered to its last token; prompt and padding are 0. This is `Generator.token_nll`'s
                             layout and the training batches' (`to_batches`): loss_mask[i, t] goes with labels[i, t].
    old_logp       [N, T-1]  float32, log π_θold(tokens[i, t+1] | tokens[i, :t+1]) on the mask, 0 elsewhere.
Per group: `rewards` [num_groups, G] (the weighted sum, `rewards.combine`); per sample: `advantages` [N] and the
reward scores by name, the prompt's index, the completion text (what the rewards read, without the EOS) and the
stop reason.

old_logp is the log-prob of the model's own distribution (softmax of the logits), not of the tempered, nucleus-cut
distribution the tokens were drawn from: the update's log π_θ is the same plain forward, so ρ = π_θ / π_θold is 1 at
θ = θold. (R1-Zero samples at temperature 1 and top-p 1, where the two coincide.) It is computed in eval mode; the
model has no dropout, but a training-only mechanism (deepseek_v2's token dropping) would make the update's forward
differ, and ρ at θ = θold differ from 1.

Determinism: each copy of each prompt has its own random stream, drawn from `seed` and its row (the Generator's
contract), so the same weights, items, seed and generation batch size give the same rollout, bit for bit (another
batch size regroups rows, which can change floating-point sums and so, rarely, a draw). A resumed run that passes
`rollout_seed(cfg.seed, step)` redraws exactly the rollout of the step it resumes. Ranks sampling different items
should pass different seeds (e.g. fold the rank into `base`).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from training import tokenizer as T
from training.data.chat import ChatTemplate, Message
from training.rl import rewards as R
from training.rl.grpo_loss import group_advantages
from training.verify.tasks import TaskItem

TRUNCATED = ("max_new_tokens", "context_full")   # stop reasons of a response without its closing EOS


@dataclass
class Rollout:
    """One step's sampled experience (see the module docstring for the layout)."""

    tokens: Tensor                  # [N, T] long, DeepSeek ids, right-padded with PAD
    response_mask: Tensor           # [N, T-1] bool: labels tokens[:, 1:] that are response tokens (EOS included)
    old_logp: Tensor                # [N, T-1] float32, sampling policy's log-prob of each label, 0 off the mask
    rewards: Tensor                 # [num_groups, G] float32, the weighted sum of the scores
    scores: dict[str, list[float]]  # each reward's score per sample (N)
    advantages: Tensor              # [N] float32, group-relative, exactly 0 in a group whose rewards are all equal
    group_size: int
    prompt_index: list[int]         # per sample: the index of its item (= row // group_size)
    prompt_lengths: list[int]       # per sample: prompt tokens (the response starts at this position of `tokens`)
    completions: list[str]          # per sample: the decoded response (without EOS), as the rewards scored it
    stop_reasons: list[str]         # per sample: the Generator's ("eod", "max_new_tokens", "context_full")
    stats: dict[str, float]         # what the step logs (`summary`)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]


def rollout_seed(base: int, step: int) -> int:
    """The sampling seed of the rollout at optimizer step `step`: a pure function of (base, step), so a resumed run
    redraws the same rollout, and distinct pairs give unrelated streams (unlike base + step)."""
    digest = hashlib.sha256(f"seekflow-rollout\0{base}\0{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def prompt_and_reference(item: TaskItem | tuple[str, Any]) -> tuple[str, Any]:
    """(user prompt, what the accuracy reward checks against) of an item: a task-suite `TaskItem` is its own
    reference; a (prompt, reference) pair holds e.g. a math question and its answer string."""
    if isinstance(item, TaskItem):
        return item.prompt, item
    prompt, reference = item
    return prompt, reference


@torch.no_grad()
def collect(generator, items: Sequence[TaskItem | tuple[str, Any]], *, group_size: int,
            rewards: Sequence[R.Reward], weights: dict[str, float], max_new_tokens: int, seed: int,
            temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None, reply_prefix: str = "",
            scale_by_std: bool = True, template=None, row_seeds: Sequence[int] | None = None) -> Rollout:
    """Sample `group_size` completions of each item's prompt with `generator` (a `training.eval.generate.Generator`
    over the policy's GPTModel), score them, and return the `Rollout`.

    The prompt is `template.prompt([system?, user])` (DeepSeek-V3's chat template; default: over the generator's
    tokenizer). `system_prompt`, when given, is a system message, which the template places right after BOS: that
    is where an R1-Zero instruction such as R1's Table 1 goes (a config value; none is built in). `reply_prefix` is
    text appended after `<｜Assistant｜>` as part of the prompt (e.g. "<think>\\n" for the "r1" format); it is
    prepended to each completion before scoring, so the rewards read the whole reply. Completions end at the
    end-of-sentence token or after `max_new_tokens`. `weights` names every reward (`rewards.combine`).
    `row_seeds`: each row's sampling stream (default: drawn from `seed`; a data-parallel rank passes its rows' slice
    of the whole rollout's, so that the ranks together draw what one process would)."""
    if group_size < 1 or not items:
        raise ValueError(f"need group_size >= 1 and at least one item; got {group_size} and {len(items)} items")
    template = template if template is not None else ChatTemplate(generator.tok)
    pairs = [prompt_and_reference(item) for item in items]
    system = [Message("system", system_prompt)] if system_prompt else []
    prefix = generator.encode(reply_prefix) if reply_prefix else []
    prompts = [template.prompt([*system, Message("user", prompt)]) + prefix for prompt, _ in pairs]
    rows = [k for k in range(len(items)) for _ in range(group_size)]   # one sampling stream per copy of a prompt

    gpt = generator.gpt
    was_training = gpt.training
    gpt.eval()
    clock = [time.perf_counter()]   # phase boundaries: sampled, old log-probs, scored
    try:
        outs = generator.generate([prompts[k] for k in rows], max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, seeds=row_seeds)
        clock.append(time.perf_counter())
        responses = [o.token_ids + ([o.stop_token_id] if o.stop_reason == "eod" else []) for o in outs]
        prompt_lengths = [len(prompts[k]) for k in rows]
        tokens, mask = _layout([prompts[k] for k in rows], responses)
        old_logp = label_logp(generator, tokens, mask, row_lengths(prompt_lengths, mask))
        clock.append(time.perf_counter())
    finally:
        gpt.train(was_training)

    completions = [reply_prefix + o.text for o in outs]
    scores = R.score_all(rewards, completions, [pairs[k][1] for k in rows])
    clock.append(time.perf_counter())
    combined = torch.tensor(R.combine(scores, weights), dtype=torch.float32).view(len(items), group_size)
    advantages = group_advantages(combined, scale_by_std=scale_by_std).reshape(-1)
    rollout = Rollout(tokens=tokens, response_mask=mask, old_logp=old_logp, rewards=combined, scores=scores,
                      advantages=advantages, group_size=group_size, prompt_index=rows,
                      prompt_lengths=prompt_lengths, completions=completions,
                      stop_reasons=[o.stop_reason for o in outs], stats={})
    rollout.stats = {**summary(rollout), **{f"seconds/{phase}": end - start for phase, start, end in zip(
        ("generate", "old_logp", "rewards"), clock, clock[1:])}}
    return rollout


def concat(parts: Sequence[Rollout], ref_logps: Sequence[Tensor | None] = ()) -> tuple[Rollout, Tensor | None]:
    """The rollouts of several ranks as one, in order (each part's groups after the previous part's), right-padded
    to the longest; with each part's reference log-probs ([N, T-1] as old_logp) joined the same way. Stats are
    recomputed over the whole; each phase's seconds is the slowest part's (the ranks wait for it)."""
    width = max(p.tokens.shape[1] for p in parts)

    def wide(x: Tensor, columns: int, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, columns - x.shape[1]), value=value)

    offsets = [sum(q.num_groups for q in parts[:i]) for i in range(len(parts))]   # prompt_index: into the whole
    whole = Rollout(
        tokens=torch.cat([wide(p.tokens, width, T.token_id(T.PAD)) for p in parts]),
        response_mask=torch.cat([wide(p.response_mask, width - 1, False) for p in parts]),
        old_logp=torch.cat([wide(p.old_logp, width - 1, 0.0) for p in parts]),
        rewards=torch.cat([p.rewards for p in parts]), advantages=torch.cat([p.advantages for p in parts]),
        scores={name: [v for p in parts for v in p.scores[name]] for name in parts[0].scores},
        group_size=parts[0].group_size,
        prompt_index=[k + offset for p, offset in zip(parts, offsets) for k in p.prompt_index],
        prompt_lengths=[n for p in parts for n in p.prompt_lengths],
        completions=[c for p in parts for c in p.completions], stop_reasons=[r for p in parts for r in p.stop_reasons],
        stats={})
    whole.stats = {**summary(whole), **{key: max(p.stats[key] for p in parts)
                                        for key in parts[0].stats if key.startswith("seconds/")}}
    ref = None
    if ref_logps and ref_logps[0] is not None:
        ref = torch.cat([wide(r, width - 1, 0.0) for r in ref_logps])
    return whole, ref


def _layout(prompts: list[list[int]], responses: list[list[int]]) -> tuple[Tensor, Tensor]:
    """tokens [N, T] (right-padded with PAD) and the label-aligned response mask [N, T-1]."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), length), T.token_id(T.PAD), dtype=torch.long)
    mask = torch.zeros((len(prompts), length - 1), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        tokens[i, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[i, len(prompt) - 1:len(prompt) - 1 + len(response)] = True   # label t is token t + 1
    return tokens, mask


def row_lengths(prompt_lengths: list[int], response_mask: Tensor) -> list[int]:
    """Each row's tokens before its padding: its prompt, then its response (the EOS included when produced)."""
    return [p + int(m.sum()) for p, m in zip(prompt_lengths, response_mask)]


def label_logp(generator, tokens: Tensor, mask: Tensor, lengths: list[int]) -> Tensor:
    """-`Generator.token_nll` of every label under the policy (in eval mode), in batches of rows of similar length
    (`lengths`: each row's tokens before its padding). A batch is padded only to its longest row; causal attention
    keeps a row's scores independent of the padding after it (as the Generator's uncached path relies on)."""
    order = sorted(range(len(tokens)), key=lambda i: lengths[i])
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for start in range(0, len(order), generator.batch_size):
        batch = order[start:start + generator.batch_size]
        longest = max(lengths[i] for i in batch)
        nll = generator.token_nll(tokens[batch, :longest])                 # [b, longest - 1] float64
        out[batch, :longest - 1] = (-nll).float()
    return torch.where(mask, out, torch.zeros_like(out))


def summary(rollout: Rollout) -> dict[str, float]:
    """The step's rollout metrics: mean combined reward and each reward's mean (`reward/format` is the format rate,
    `reward/accuracy` the accuracy), mean response length in tokens (EOS included), the share of cut-off responses,
    the share of groups with zero advantage (all rewards equal: no learning signal), and the policy's entropy per
    response token, estimated as -mean(old_logp) over the sampled tokens (unbiased at temperature 1 and top-p 1,
    where the tokens are drawn from the policy itself; otherwise the cross-entropy of the sampling distribution)."""
    groups = rollout.advantages.view(rollout.num_groups, rollout.group_size)
    cut = sum(reason in TRUNCATED for reason in rollout.stop_reasons)
    tokens = rollout.response_mask.sum()
    return {"reward": rollout.rewards.mean().item(), **R.means(rollout.scores),
            "entropy": (-(rollout.old_logp * rollout.response_mask).sum() / tokens.clamp(min=1)).item(),
            "response_length": rollout.response_mask.sum(1).float().mean().item(),
            "truncated_fraction": cut / len(rollout),
            "zero_advantage_groups": (groups == 0).all(1).float().mean().item()}


def to_batches(rollout: Rollout, micro_batch_size: int, seq_length: int | None = None) -> Iterator[dict[str, Tensor]]:
    """Training micro-batches of the rollout's rows, in order: {tokens, labels, loss_mask, position_ids, old_logp,
    advantages}, each [b, S] with S = T - 1 (or `seq_length`, padded: megatron's pipeline needs one fixed length).

    tokens/labels are tokens[:, :-1]/tokens[:, 1:] in DeepSeek ids (the train step maps them to rows); loss_mask is
    the response mask (float32, as `NextTokenLoss` reads it); old_logp goes with labels; advantages is each row's
    advantage repeated along the sequence, so context parallelism's split along dim 1 keeps it (a loss takes
    [:, 0] for `grpo_loss`'s [b])."""
    length = rollout.tokens.shape[1] - 1
    width = length if seq_length is None else seq_length
    if width < length:
        raise ValueError(f"seq_length {seq_length} is shorter than the rollout's {length} label positions")
    pad = width - length

    def padded(x: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x

    for start in range(0, len(rollout), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        tokens = rollout.tokens[rows]
        b = tokens.shape[0]
        yield {"tokens": padded(tokens[:, :-1], T.token_id(T.PAD)),
               "labels": padded(tokens[:, 1:], T.token_id(T.PAD)),
               "loss_mask": padded(rollout.response_mask[rows].float(), 0.0),
               "position_ids": torch.arange(width, dtype=torch.long).expand(b, width).contiguous(),
               "old_logp": padded(rollout.old_logp[rows], 0.0),
               "advantages": rollout.advantages[rows].float().unsqueeze(1).expand(b, width).contiguous()}
