"""The sft stage on the micro preset: a chat-capable micro parent (the micro architecture on DeepSeek's BPE cut to
240 merges, pretrained 2 steps on synthetic ids of that vocabulary), then sft runs from it."""
from __future__ import annotations

import sys

from training.data.synthetic import write_synthetic_curate

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training

MERGES = 240   # the micro preset's sft model: 256 + 240 + 16 special tokens = its 512 rows


def chat_parent(root):
    """Pretrain the parent under `root` (corpus, 2 steps); returns its release directory."""
    write_synthetic_curate(root, vocab_size=512, vocab_merges=MERGES, documents=40)
    out = run_training("pretrain", "--preset", "micro", *(arg for item in (
        f"run_root={root}", "train.steps=2", f"model.vocab_merges={MERGES}", f"tracking.uri={sqlite_store(root)}")
        for arg in ("--set", item)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "pretrain" / "release"


def arguments(run_root, parent, *overrides: str) -> list[str]:
    sets = [f"run_root={run_root}", f"init_checkpoint={parent}", f"tracking.uri={sqlite_store(run_root)}", *overrides]
    return ["sft", "--preset", "micro", *(arg for item in sets for arg in ("--set", item))]


def sft(run_root, parent, *overrides: str):
    """`sft --preset micro` from `parent` in a fresh process (forked from the test zygote)."""
    return run_training(*arguments(run_root, parent, *overrides))


def command(run_root, parent, *overrides: str) -> list[str]:
    """The same run as an interpreter command line, for a test that kills it."""
    return [sys.executable, "-W", "ignore", "-m", "training", *arguments(run_root, parent, *overrides)]
