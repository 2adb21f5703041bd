"""GRPO's rule-based rewards: format, accuracy and language consistency, each a float per completion, combined by
weight. No reward model: DeepSeek-R1-Zero (DeepSeek-R1, §2.2.2) "adopt[s] a rule-based reward system that mainly
consists of two types of rewards", accuracy and format, to avoid reward hacking by a neural reward model.

Two completion formats (`fmt`); a completion is the decoded text of the generated tokens, without the closing
end-of-sentence token (`<think>`/`</think>` are ordinary added tokens of DeepSeek's tokenizer, so decoding keeps them):
    "r1-zero"  DeepSeek-R1 Table 1's template: "<think> reasoning process here </think> <answer> answer here
               </answer>". Exactly one think block, then exactly one answer block; whitespace may surround and separate
               them, nothing else may stand outside them; both must be non-blank.
    "r1"       A reasoning turn as training/data/chat.py renders it: `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`.
               One think block at the start, then a non-blank answer (no answer tags). A rollout whose prompt already
               ends in `<think>` must prepend it to the completion.
Either way a tag inside a block (nested, repeated), a missing tag, or the answer before the reasoning is malformed:
format 0, no answer, accuracy 0, language consistency 0.

A reward is a `Reward(name, score)` whose `score(completions, references) -> list[float]` scores a batch (code checks
cost a sandboxed process each, so they run as one batch); `each(name, fn)` lifts a per-completion function
`fn(completion, reference) -> float`. `score_all` runs a list of them, `combine` sums them by weight (R1 §2.3.2 sums
accuracy and language consistency directly: weights of 1), `means` gives the `reward/<name>` values to log.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from training.tokenizer import THINK_BEGIN, THINK_END
from training.verify import tasks
from training.verify.spec import Limits
from training.verify.tasks import TaskItem

FORMATS = ("r1-zero", "r1")
LANGUAGES = ("en", "zh")
ANSWER_BEGIN, ANSWER_END = "<answer>", "</answer>"
TAGS = (THINK_BEGIN, THINK_END, ANSWER_BEGIN, ANSWER_END)

_R1_ZERO = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_R1 = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


# ---------------------------------------------------------------------------------------------- the protocol --
@dataclass(frozen=True)
class Reward:
    """A named reward: `score(completions, references)` gives one float per completion, in order."""

    name: str
    score: Callable[[list[str], list[Any]], list[float]]


def each(name: str, fn: Callable[[str, Any], float]) -> Reward:
    """A `Reward` from a per-completion function `fn(completion, reference) -> float`."""
    return Reward(name, lambda completions, refs: [float(fn(c, r)) for c, r in zip(completions, refs, strict=True)])


def score_all(rewards: Sequence[Reward], completions: list[str], references: list[Any]) -> dict[str, list[float]]:
    """Every reward's scores of the batch, by name."""
    if len({r.name for r in rewards}) != len(rewards):
        raise ValueError(f"reward names must be distinct, got {[r.name for r in rewards]}")
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    return {r.name: list(r.score(completions, references)) for r in rewards}


def combine(scores: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """Σ_name weights[name] * scores[name][i] for each completion i. The names must match exactly (a reward to log
    but not train on gets weight 0), so a misspelt weight cannot silently drop a reward."""
    if set(scores) != set(weights):
        raise ValueError(f"weights name {sorted(weights)} but the scores are {sorted(scores)}")
    lengths = {len(v) for v in scores.values()}
    if len(lengths) > 1:
        raise ValueError(f"every reward must score every completion: {({k: len(v) for k, v in scores.items()})}")
    count = lengths.pop() if lengths else 0
    return [sum(weights[name] * scores[name][i] for name in scores) for i in range(count)]


def means(scores: dict[str, list[float]]) -> dict[str, float]:
    """`reward/<name>`: each reward's mean over the batch (what a GRPO step logs)."""
    return {f"reward/{name}": (sum(v) / len(v) if v else 0.0) for name, v in scores.items()}


# ------------------------------------------------------------------------------------------------- the format --
def _parts(completion: str, fmt: str) -> tuple[str, str] | None:
    """(reasoning, answer) of a well-formed completion, neither stripped; None when malformed."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    match = (_R1_ZERO if fmt == "r1-zero" else _R1).fullmatch(completion)
    if match is None:
        return None
    reasoning, answer = match.groups()
    # The lazy match stops at the first closer, so a second tag anywhere lands inside a group: nested or repeated.
    if any(tag in part for part in (reasoning, answer) for tag in TAGS):
        return None
    if not reasoning.strip() or not answer.strip():
        return None
    return reasoning, answer


def format_reward(completion: str, fmt: str = "r1-zero") -> float:
    """1.0 when the completion has exactly the format's shape (module docstring), else 0.0 (R1 §2.2.2)."""
    return 1.0 if _parts(completion, fmt) is not None else 0.0


def extract_answer(completion: str, fmt: str = "r1-zero") -> str | None:
    """The answer, whitespace trimmed: the `<answer>` block's text (r1-zero) or the text after `</think>` (r1);
    None when the completion is malformed."""
    parts = _parts(completion, fmt)
    return parts[1].strip() if parts else None


def extract_reasoning(completion: str, fmt: str = "r1-zero") -> str | None:
    """The think block's text, whitespace trimmed; None when the completion is malformed."""
    parts = _parts(completion, fmt)
    return parts[0].strip() if parts else None


# ----------------------------------------------------------------------------------------------- accuracy --
def _math_parse(text: str, timeout_s: int | None) -> list:
    """math-verify's parse of a whole answer. Text without math delimiters is read as one inline LaTeX expression:
    bare, math-verify picks the last number it finds ("4, 5" would read as 5, "\\{2, 1\\}" as 1)."""
    from math_verify import parse

    if any(mark in text for mark in ("$", "\\(", "\\[", "\\boxed")):
        return parse(text, parsing_timeout=timeout_s)
    return parse(f"${text}$", parsing_timeout=timeout_s) or parse(text, parsing_timeout=timeout_s)


def math_accuracy(completion: str, reference: str, fmt: str = "r1-zero", timeout_s: int = 3) -> float:
    """1.0 when the extracted answer equals `reference` by math-verify (the accuracy check of open-r1's and TRL's
    GRPO recipes): "0.5" matches "\\frac{1}{2}", "2" matches "$x=2$". Malformed or unparsable: 0.0; never raises.

    math-verify times each parse and comparison out with SIGALRM (`timeout_s`, whole seconds), which works only in
    the main thread; elsewhere it runs without a time limit, so score math from the main thread."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    answer = extract_answer(completion, fmt)
    if answer is None:
        return 0.0
    limit = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        # A side that parses to nothing is kept as its text: verify then compares strings, equal or not.
        gold = _math_parse(reference, limit) or [reference.strip()]
        pred = _math_parse(answer, limit) or [answer]
        return 1.0 if verify(gold, pred, timeout_seconds=limit) else 0.0
    # Model-written text must never stop a step; math-verify's timeout is a BaseException, so it is named.
    except (Exception, TimeoutException):   # noqa: BLE001
        return 0.0


def task_accuracy(completions: list[str], items: list[TaskItem], fmt: str = "r1-zero", limits: Limits | None = None,
                  sandbox_url: str | None = None) -> list[float]:
    """The task suite's own checkers (training/verify/tasks.py) on each extracted answer: 1.0 right, 0.0 wrong or
    malformed. Code items run in the sandbox as one batch under `limits` (default: `check_code_many`'s, the same
    as evaluation); a program that loops forever is killed at the wall limit and scores 0. A host that cannot
    sandbox raises `SandboxUnavailable`: a missing sandbox is not a wrong answer."""
    answers = [extract_answer(c, fmt) for c in completions]
    scores = [0.0] * len(answers)
    code = [i for i, (item, a) in enumerate(zip(items, answers, strict=True)) if a is not None and item.task == "code"]
    for i, (item, answer) in enumerate(zip(items, answers)):
        if answer is not None and item.task != "code":
            scores[i] = float(tasks.check(item, answer))
    if code:
        passed = _run_code([items[i] for i in code], [answers[i] for i in code], limits, sandbox_url)
        for i, ok in zip(code, passed, strict=True):
            scores[i] = float(ok)
    return scores


def _run_code(items: list[TaskItem], answers: list[str], limits: Limits | None, sandbox_url: str | None) -> list[bool]:
    if limits is None:
        return tasks.check_code_many(items, answers, sandbox_url=sandbox_url)
    from training.verify.sandbox import run_many

    programs = [tasks.code_program(item, answer) for item, answer in zip(items, answers, strict=True)]
    return [o.status == "passed" for o in run_many(programs, limits, sandbox_url=sandbox_url)]


def accuracy(completions: list[str], references: list[TaskItem | str], fmt: str = "r1-zero",
             limits: Limits | None = None, sandbox_url: str | None = None) -> list[float]:
    """Accuracy against mixed references: a `TaskItem` is checked by the task suite (code in one sandbox batch), a
    string is a math answer checked by math-verify."""
    for ref in references:
        if not isinstance(ref, (TaskItem, str)):
            raise TypeError(f"a reference is a TaskItem or a math answer string, not {type(ref).__name__}")
    suite = [i for i, ref in enumerate(references) if isinstance(ref, TaskItem)]
    checked = task_accuracy([completions[i] for i in suite], [references[i] for i in suite], fmt, limits, sandbox_url)
    scores = [0.0 if isinstance(ref, TaskItem) else math_accuracy(c, ref, fmt)
              for c, ref in zip(completions, references, strict=True)]
    for i, score in zip(suite, checked, strict=True):
        scores[i] = score
    return scores


# ------------------------------------------------------------------------------------- language consistency --
# Words, by script (no language model: fastText-style language ID is unreliable on single words). A Han character is
# a word of its own (Chinese is not written with spaces); any other run of letters is one word. Digits, punctuation,
# symbols and whitespace are not words, so arithmetic and most math notation count for neither side; a LaTeX command
# such as \frac is a run of ASCII letters and counts as English.
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_WORD = re.compile(rf"[{_HAN}]|[^\W\d_{_HAN}]+")
_IN_LANGUAGE = {
    "en": re.compile(r"[A-Za-z]+").fullmatch,       # English: a word made of ASCII letters only
    "zh": re.compile(rf"[{_HAN}]").fullmatch,       # Chinese: a Han character
}


def language_share(text: str, language: str = "en") -> float:
    """The share of `text`'s words that are in `language` ("en" or "zh"); 0.0 when it has no words."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    words = _WORD.findall(text)
    if not words:
        return 0.0
    in_language = _IN_LANGUAGE[language]
    return sum(1 for w in words if in_language(w)) / len(words)


def language_consistency(completion: str, language: str = "en", fmt: str = "r1-zero") -> float:
    """DeepSeek-R1 §2.3.2: "calculated as the proportion of target language words in the CoT", the CoT being the
    think block. 0.0 when malformed, and when the reasoning has no words at all: a wordless CoT shows no language to
    be consistent in, and paying it in full would reward dropping words rather than keeping to one language."""
    reasoning = extract_reasoning(completion, fmt)
    return 0.0 if reasoning is None else language_share(reasoning, language)


# -------------------------------------------------------------------------------------------------- presets --
def standard(fmt: str = "r1-zero", language: str | None = "en", limits: Limits | None = None,
             sandbox_url: str | None = None) -> list[Reward]:
    """R1's rewards for `fmt`: "format", "accuracy" (references: TaskItems and/or math answer strings) and, unless
    `language` is None, "language" consistency. Weigh them with `combine`."""
    rewards = [each("format", lambda c, _: format_reward(c, fmt)),
               Reward("accuracy", lambda cs, refs: accuracy(cs, refs, fmt, limits, sandbox_url))]
    if language is not None:
        rewards.append(each("language", lambda c, _: language_consistency(c, language, fmt)))
    return rewards
