"""Arithmetic scoring: the integer a completion answers with, and accuracy over the generated items
(`training.benchmarks_data`: questions, answers and the few-shot prompt).

Answers are extracted the GSM8K way (Cobbe et al. 2021, arXiv:2110.14168): an explicit "#### N" or "answer is N"
wins, else the first number of the first line, with thousands separators and a trailing ".0" tolerated.
"""
from __future__ import annotations

import re
from typing import Sequence

from training.benchmarks_data import ArithItem

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_EXPLICIT = re.compile(rf"(?:####|answer is:?)\s*\$?\s*({_NUMBER})", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def extract_answer(text: str) -> int | None:
    """The integer a completion answers with, or None when it gives no number."""
    match = _EXPLICIT.search(text)
    token = match.group(1) if match else None
    if token is None:
        first_line = text.strip().split("\n", 1)[0] if text.strip() else ""
        found = _ANY.search(first_line)
        token = found.group(0) if found else None
    if token is None:
        return None
    token = token.replace(",", "")
    try:
        value = float(token)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def score(completions: Sequence[str], items: Sequence[ArithItem]) -> dict[str, float]:
    hits = [extract_answer(c) == item.answer for c, item in zip(completions, items, strict=True)]
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "problems": float(len(hits))}
