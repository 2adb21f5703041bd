"""The code_cpt stage on the micro preset: it continues the layout tests' one-process release (`one_process_run`:
micro with 4 layers, 4 steps) on the micro corpus, so its runs need no parent of their own."""
from __future__ import annotations

import sys

from tests.support.layouts import LAYERS
from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training

PARENT_ARCHITECTURE = f"model.num_layers={LAYERS}"   # the parent's; the micro preset's own model has 3 layers


def parent_release(one_process_run):
    return one_process_run / "pretrain" / "release"


def arguments(run_root, corpus_root, parent, *overrides: str, architecture: bool = True) -> list[str]:
    """`code_cpt --preset micro ...` from `parent` on the corpus at `{corpus_root}/curate`, with an MLflow store
    seeded under `run_root`; `architecture`: set the parent's (False: keep the preset's, which the parent refuses)."""
    sets = [f"run_root={run_root}", f"data_manifest={corpus_root}/curate", f"init_checkpoint={parent}",
            f"tracking.uri={sqlite_store(run_root)}", *([PARENT_ARCHITECTURE] if architecture else []), *overrides]
    return ["code_cpt", "--preset", "micro", *(arg for item in sets for arg in ("--set", item))]


def code_cpt(run_root, corpus_root, parent, *overrides: str, architecture: bool = True):
    """Run the stage in a fresh process (forked from the test zygote); returns the CompletedProcess."""
    return run_training(*arguments(run_root, corpus_root, parent, *overrides, architecture=architecture))


def command(run_root, corpus_root, parent, *overrides: str, architecture: bool = True) -> list[str]:
    """The same run as an interpreter command line, for a test that kills it."""
    return [sys.executable, "-W", "ignore", "-m", "training",
            *arguments(run_root, corpus_root, parent, *overrides, architecture=architecture)]
