"""The grpo stage on the micro preset, from the micro chat parent (tests/support/sft.py)."""
from __future__ import annotations

import sys

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training


def arguments(run_root, parent, *overrides: str) -> list[str]:
    sets = [f"run_root={run_root}", f"init_checkpoint={parent}", f"tracking.uri={sqlite_store(run_root)}", *overrides]
    return ["grpo", "--preset", "micro", *(arg for item in sets for arg in ("--set", item))]


def grpo(run_root, parent, *overrides: str):
    """`grpo --preset micro` from `parent` in a fresh process (forked from the test zygote)."""
    return run_training(*arguments(run_root, parent, *overrides))


def command(run_root, parent, *overrides: str) -> list[str]:
    """The same run as an interpreter command line, for a test that kills it."""
    return [sys.executable, "-W", "ignore", "-m", "training", *arguments(run_root, parent, *overrides)]
