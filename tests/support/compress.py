"""The compress stage on the micro preset: a micro sft release (tests/support/distill.py's micro teacher) pruned
with CAP, its pre-trained parent the chat parent (tests/support/sft.py)."""
from __future__ import annotations

import sys

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training


def arguments(run_root, fine_tuned, pretrained, *overrides: str) -> list[str]:
    sets = [f"run_root={run_root}", f"fine_tuned={fine_tuned}", f"pretrained={pretrained}",
            f"tracking.uri={sqlite_store(run_root)}", *overrides]
    return ["compress", "--preset", "micro", *(arg for item in sets for arg in ("--set", item))]


def compress(run_root, fine_tuned, pretrained, *overrides: str):
    """`compress --preset micro` in a fresh process (forked from the test zygote)."""
    return run_training(*arguments(run_root, fine_tuned, pretrained, *overrides))


def command(run_root, fine_tuned, pretrained, *overrides: str) -> list[str]:
    """The same run as an interpreter command line, for a test that kills it."""
    return [sys.executable, "-W", "ignore", "-m", "training", *arguments(run_root, fine_tuned, pretrained, *overrides)]
