"""Passkey retrieval scoring, per context length. The prompts (Mohtashami & Jaggi 2023's format, each exactly the
requested number of tokens) are built by `training.benchmarks_data`; DeepSeek-V2/V3 report the same kind of
needle-in-a-haystack test after context extension. Greedy continuation; a hit is the key appearing in it.
"""
from __future__ import annotations

from typing import Sequence

from training.benchmarks_data import PasskeyItem


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
