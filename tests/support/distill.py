"""The distill stage on the micro preset: a micro teacher that answers the preset's prompts (mostly) correctly, and
distill runs from it."""
from __future__ import annotations

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training
from tests.support.sft import sft

TEACHER_STEPS = 120   # sft steps on the 8 prompts that distill samples: enough to answer most of them (~45 s)


def micro_teacher(root, parent):
    """A micro sft release fine-tuned from `parent` (a chat parent: tests/support/sft.py) on the very train prompts
    the micro distill section samples (the task suite's train split, same items and seed) until it mostly answers
    them, run in `root`; returns its release directory."""
    out = sft(root, parent, "tasks.train_items=8", f"train.steps={TEACHER_STEPS}",
              "train.save_interval=1000", "train.log_interval=20")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "sft" / "release"


def distill(run_root, *overrides: str, tracking_root=None):
    """`distill --preset micro` in a fresh process; MLflow in `tracking_root`'s sqlite store (default: run_root's)."""
    sets = [f"run_root={run_root}", f"tracking.uri={sqlite_store(tracking_root or run_root)}", *overrides]
    return run_training("distill", "--preset", "micro", *(arg for item in sets for arg in ("--set", item)))
