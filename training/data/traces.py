"""Rejection sampling of a teacher's traces (DeepSeek-R1 §2.3.3: "for each prompt, we sample multiple responses and
retain only the correct ones"), into conversation records the sft data reader takes (training/data/chat.py).

A completion is kept when it ended on its own (the end-of-sentence token, within the token budget) and the task's
exact checker accepts its answer; the same reply sampled twice for one prompt is kept once. Everything else is
counted by reason: `unfinished` (no end-of-sentence in budget) and `wrong` (the checker refuses it) are the rejected
share, the first REJECT_SAMPLES of each set aside for a person to read; `duplicate` (correct, but already kept for
that prompt) is neither rejected nor kept again.

A completion with R1's reasoning frame, `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`, becomes an assistant turn
with `reasoning_content`, so the chat template renders it back to the teacher's own text.

Pure Python: the stage (training/stages/distill.py) does the sampling; this module decides what is kept.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from training import tokenizer as T
from training.verify import tasks

KEPT, DUPLICATE, UNFINISHED, WRONG = "kept", "duplicate", "unfinished", "wrong"
ENDED = "eod"   # training.eval.generate.Generation.stop_reason of a completion that closed its own turn
REJECT_SAMPLES = 100   # rejected completions kept per reason for a person to read (the counts cover them all)


@dataclass(frozen=True)
class Completion:
    """One sampled reply: its text (special tokens spelled out) and why decoding stopped."""

    text: str
    stop_reason: str


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a completion: R1's `<think>` frame taken apart, or (None, text) without one."""
    if T.THINK_END not in text:
        return None, text
    reasoning, answer = text.rsplit(T.THINK_END, 1)
    reasoning = reasoning.removeprefix(T.THINK_BEGIN).removeprefix("\n").removesuffix("\n")
    return reasoning, answer.removeprefix("\n\n")


def trace_record(item: tasks.TaskItem, completion: Completion, sample: int) -> dict:
    """A kept completion as a conversation record: the item's prompt, the teacher's reply as the assistant turn."""
    reasoning, answer = split_reasoning(completion.text)
    reply = {"role": "assistant", "content": answer}
    if reasoning is not None:
        reply["reasoning_content"] = reasoning
    return {"messages": [{"role": "user", "content": item.prompt}, reply], "task": item.task, "id": item.id,
            "sample": sample}


def grade(items: list[tasks.TaskItem], texts: list[str], sandbox_url: str | None = None) -> list[bool]:
    """The task checker's verdict on each text; code items are run together, in one batch of sandboxed programs."""
    verdicts = [False] * len(items)
    code = [i for i, item in enumerate(items) if item.task == "code"]
    if code:
        passed = tasks.check_code_many([items[i] for i in code], [texts[i] for i in code], sandbox_url=sandbox_url)
        for i, ok in zip(code, passed):
            verdicts[i] = ok
    for i, item in enumerate(items):
        if item.task != "code":
            verdicts[i] = tasks.check(item, texts[i])
    return verdicts


@dataclass
class Selection:
    """What rejection sampling kept (`records`), and how every sampled completion was judged."""

    records: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)               # the first REJECT_SAMPLES per reason
    outcomes: Counter = field(default_factory=Counter)               # reason -> completions
    by_task: dict[str, Counter] = field(default_factory=dict)       # task -> reason -> completions
    prompts: int = 0
    prompts_kept: int = 0                                            # prompts with at least one kept trace

    def summary(self) -> dict:
        """Counts for the manifest: `rejection_rate` is the rejected share (unfinished + wrong) of the samples."""
        def rates(counts: Counter) -> dict:
            sampled = sum(counts.values())
            rejected = counts[UNFINISHED] + counts[WRONG]
            return {"sampled": sampled, "correct": counts[KEPT] + counts[DUPLICATE], "kept": counts[KEPT],
                    "duplicates": counts[DUPLICATE], "unfinished": counts[UNFINISHED], "wrong": counts[WRONG],
                    "rejection_rate": rejected / sampled if sampled else 0.0}

        return {**rates(self.outcomes), "prompts": self.prompts, "prompts_kept": self.prompts_kept,
                "tasks": {task: rates(counts) for task, counts in sorted(self.by_task.items())}}


def select(items: list[tasks.TaskItem], completions: list[list[Completion]], correct: list[list[bool]]) -> Selection:
    """Rejection sampling over `completions[i]`, the samples for `items[i]`, with the checker's verdicts
    `correct[i]` (see `grade`)."""
    chosen = Selection(prompts=len(items))
    for item, samples, verdicts in zip(items, completions, correct, strict=True):
        seen: set[str] = set()
        for sample, (completion, ok) in enumerate(zip(samples, verdicts, strict=True)):
            if completion.stop_reason != ENDED:
                outcome = UNFINISHED
            elif not ok:
                outcome = WRONG
            elif completion.text in seen:
                outcome = DUPLICATE
            else:
                outcome = KEPT
                seen.add(completion.text)
                chosen.records.append(trace_record(item, completion, sample))
            if outcome in (UNFINISHED, WRONG) and chosen.outcomes[outcome] < REJECT_SAMPLES:
                chosen.rejected.append({"id": item.id, "task": item.task, "prompt": item.prompt, "sample": sample,
                                        "reason": outcome, "completion": completion.text})
            chosen.outcomes[outcome] += 1
            chosen.by_task.setdefault(item.task, Counter())[outcome] += 1
        chosen.prompts_kept += bool(seen)
    return chosen
