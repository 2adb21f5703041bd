"""A generated, verifiable arithmetic set: integer expressions with exact answers, few-shot prompted.

Generated rather than shipped so it cannot have leaked into training text, is free of licensing, and can be sized and
made harder (operand range, operations, two-step expressions) from config. Answers are extracted the GSM8K way
(Cobbe et al. 2021, arXiv:2110.14168): an explicit "#### N" or "answer is N" wins, else the first number of the
first line, with thousands separators and a trailing ".0" tolerated.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

OPERATIONS = ("+", "-", "*")
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_EXPLICIT = re.compile(rf"(?:####|answer is:?)\s*\$?\s*({_NUMBER})", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


@dataclass(frozen=True)
class ArithItem:
    id: str
    question: str       # "What is 37 + 45?"
    answer: int


_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _expression(rng: random.Random, max_operand: int, operations: Sequence[str], two_step: bool) -> tuple[str, int]:
    """(text, exact value) of `a op b`, or `(a op b) op c` for a two-step item."""
    a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operations)
    text, value = f"{a} {op} {b}", _APPLY[op](a, b)
    if two_step:
        c, op = rng.randint(0, max_operand), rng.choice(operations)
        text, value = f"({text}) {op} {c}", _APPLY[op](value, c)
    return text, value


def draw_items(count: int, seed: int, max_operand: int = 99, operations: Sequence[str] = OPERATIONS,
               two_step_fraction: float = 0.0, id_prefix: str = "arith") -> list[ArithItem]:
    rng = random.Random(f"{id_prefix}-{seed}")
    items = []
    for i in range(count):
        text, value = _expression(rng, max_operand, operations, rng.random() < two_step_fraction)
        items.append(ArithItem(f"{id_prefix}-{i}", f"What is {text}?", value))
    return items


def prompt(item: ArithItem, shots: Sequence[ArithItem]) -> str:
    """Few-shot Q/A prompt; the shots are worked examples from a separate seeded draw."""
    lines = [f"Q: {s.question}\nA: {s.answer}\n" for s in shots]
    return "".join(lines) + f"Q: {item.question}\nA:"


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
