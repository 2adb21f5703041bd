"""Training schedules as pure functions of the step and the tokens consumed: learning rate, bias update speed γ and
MTP loss weight λ; and the lr function that megatron-core's scheduler follows for the token-scheduled decay styles.
No torch here: the GPT train module installs the lr function, the token-schedule callback sets γ and λ between steps.

DeepSeek-V3 (arXiv:2412.19437 §4.2) states its schedules in tokens, DeepSeek LLM (arXiv:2401.02954 §2.3) in fractions
of the run's tokens; warm-up is in steps in both.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

T = 1e12   # one trillion tokens
B = 1e9


def warmup(step: int, peak: float, warmup_steps: int) -> float | None:
    """Linear warm-up from 0 to `peak` over `warmup_steps` (as megatron-core's: lr = peak * step / warmup_steps);
    None once warm-up is over."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak * step / warmup_steps
    return None


def deepseek_v3_lr(step: int, tokens: float, *, peak: float, min_lr: float, warmup_steps: int,
                   constant_tokens: float, decay_tokens: float,
                   tail: Sequence[tuple[float, float]] = ()) -> float:
    """DeepSeek-V3 §4.2: warm-up over `warmup_steps`, `peak` until `constant_tokens` have been consumed, cosine decay
    to `min_lr` over the next `decay_tokens`, then each `(tokens, lr)` of `tail` in turn (the last lr stays).

    V3: peak 2.2e-4, 2K warm-up steps, constant to 10T, cosine to 2.2e-5 over 4.3T, then 2.2e-5 for 333B and
    7.3e-6 for the final 167B (14.8T in all)."""
    ramp = warmup(step, peak, warmup_steps)
    if ramp is not None:
        return ramp
    if tokens < constant_tokens:
        return peak
    into_decay = tokens - constant_tokens
    if into_decay < decay_tokens:
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * into_decay / decay_tokens))
    into_tail = into_decay - decay_tokens
    lr = min_lr
    for stage_tokens, stage_lr in tail:
        lr = stage_lr
        if into_tail < stage_tokens:
            return stage_lr
        into_tail -= stage_tokens
    return lr


def multi_step_lr(step: int, tokens: float, *, peak: float, warmup_steps: int, total_tokens: float,
                  steps: Sequence[tuple[float, float]] = ((0.8, 0.316), (0.9, 0.1))) -> float:
    """DeepSeek LLM §2.3: warm-up over `warmup_steps` (2000), then `peak`; after each `(fraction, factor)` of
    `steps` — a fraction of `total_tokens` — the lr is `factor * peak` (31.6% after 80%, 10% after 90%)."""
    ramp = warmup(step, peak, warmup_steps)
    if ramp is not None:
        return ramp
    factor = 1.0
    for fraction, stage_factor in sorted(steps):
        if tokens >= fraction * total_tokens:
            factor = stage_factor
    return peak * factor


def switch_at(tokens: float, before: float, after: float | None, threshold: float | None) -> float:
    """`before` until `threshold` tokens have been consumed, then `after` (no threshold or no `after`: `before`).

    γ (DeepSeek-V3 §4.2): 0.001 for the first 14.3T tokens, 0 for the final 500B: switch_at(t, 1e-3, 0.0, 14.3e12).
    λ: 0.3 for the first 10T tokens, 0.1 after: switch_at(t, 0.3, 0.1, 10e12)."""
    if threshold is None or after is None or tokens < threshold:
        return before
    return after


TOKEN_SCHEDULED = ("deepseek-v3", "multi-step")   # decay styles megatron-core does not have: lr from `lr_function`


def lr_function(optimizer, train, samples_after: Callable[[int], int] | None = None) -> Callable[[int], float]:
    """lr(step) for the token-scheduled decay styles (an OptimizerConfig and a TrainLoopConfig). `samples_after(step)`
    gives the samples consumed before the step (a batch-size ramp makes it non-linear); default: a fixed
    global_batch_size."""
    opt = optimizer
    samples_after = samples_after or (lambda step: step * train.global_batch_size)

    def tokens(step: int) -> float:
        return samples_after(step) * train.seq_length

    if opt.decay_style == "deepseek-v3":
        return lambda step: deepseek_v3_lr(
            step, tokens(step), peak=opt.lr, min_lr=opt.min_lr, warmup_steps=opt.warmup_steps,
            constant_tokens=opt.constant_tokens, decay_tokens=opt.decay_tokens, tail=opt.lr_tail)
    return lambda step: multi_step_lr(
        step, tokens(step), peak=opt.lr, warmup_steps=opt.warmup_steps, total_tokens=tokens(train.steps),
        steps=opt.lr_steps)


def token_scheduler_class(base, lr_at: Callable[[int], float]):
    """megatron-core's OptimizerParamScheduler (`base`: state dict, weight decay, checkpointing) with our lr."""

    class TokenScheduledLR(base):
        def get_lr(self, param_group: dict) -> float:
            return lr_at(self.num_steps)

    return TokenScheduledLR
