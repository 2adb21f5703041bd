"""The verifiable task suite's config (training/verify/tasks.py): which tasks, how many items, which seed. SFT trains
on its train split, evaluation scores its held-out split, and the coming GRPO stage rewards against its checkers."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.config.base import Section

TaskName = Literal["sort", "add", "reverse", "countdown", "code"]


class TaskSuiteConfig(Section):
    tasks: list[TaskName] = Field(default_factory=lambda: ["sort", "add", "reverse"], min_length=1,
                                  description="Tasks of the suite (sort, add, reverse, countdown, code).")
    train_items: int = Field(2000, ge=1, description="Training items per task (the train split).")
    heldout_items: int = Field(50, ge=1, description="Held-out items per task that evaluation scores.")
    seed: int = Field(0, description="Which items are drawn; the train/held-out split itself never changes.")


class TasksSuite(TaskSuiteConfig):
    """Held-out exact-match accuracy on the task suite: each prompt in DeepSeek-V3's chat template, a greedy reply,
    checked exactly (code in the sandbox). Off by default: a base model has never seen the template."""

    enabled: bool = False
    max_new_tokens: int = Field(24, ge=1, le=1024)
