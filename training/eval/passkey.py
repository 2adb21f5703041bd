"""Passkey retrieval (needle in a haystack) at chosen context lengths and depths.

The format of Mohtashami & Jaggi 2023 ("Landmark Attention", arXiv:2305.16300), used since by LongLoRA and YaRN;
DeepSeek-V2/V3 report the same kind of needle-in-a-haystack test after context extension. A task line, repeated
filler sentences with one line giving a random 5-digit pass key inserted at a relative depth, and a question at the
end. Greedy continuation; a hit is the key appearing in it. Prompts are assembled in token space, so each one has
exactly the requested length (in tokens of our tokenizer).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyItem:
    id: str
    context_length: int
    depth: float
    key: str
    prompt_ids: tuple[int, ...]


def build(encode, context_length: int, depth: float, key: str) -> list[int]:
    """Token ids of one prompt of exactly `context_length` tokens with the needle at `depth` (0 = top, 1 = bottom).

    Filler is whole sentences where possible; the last filler chunk is cut at a token boundary to hit the length."""
    head, needle, tail = encode(TASK), encode(NEEDLE.format(key=key)), encode(QUESTION)
    budget = context_length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"context length {context_length} is too short for the passkey prompt "
                         f"(needs at least {len(head) + len(needle) + len(tail)} tokens)")
    filler_unit = encode(FILLER)
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    # Insert the needle at a sentence (line) boundary nearest the requested depth.
    cut = round(depth * budget / len(filler_unit)) * len(filler_unit)
    cut = min(cut, budget)
    return head + filler[:cut] + needle + filler[cut:] + tail


def draw_items(encode, context_lengths: Sequence[int], depths: Sequence[float], trials: int,
               seed: int) -> list[PasskeyItem]:
    """Every (length, depth) cell `trials` times, each with its own seeded 5-digit key."""
    rng = random.Random(f"passkey-{seed}")
    items = []
    for length in context_lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                items.append(PasskeyItem(f"len{length}-depth{depth:g}-{trial}", length, depth, key,
                                         tuple(build(encode, length, depth, key))))
    return items


def hit(generated: str, key: str) -> bool:
    return key in generated


def score(generations: Sequence[str], items: Sequence[PasskeyItem]) -> dict[str, float]:
    """Overall accuracy plus accuracy per context length (`accuracy_len<L>`)."""
    by_length: dict[int, list[bool]] = {}
    for text, item in zip(generations, items, strict=True):
        by_length.setdefault(item.context_length, []).append(hit(text, item.key))
    every = [h for hits in by_length.values() for h in hits]
    metrics = {"accuracy": sum(every) / len(every) if every else 0.0, "problems": float(len(every))}
    for length, hits in sorted(by_length.items()):
        metrics[f"accuracy_len{length}"] = sum(hits) / len(hits)
    return metrics
