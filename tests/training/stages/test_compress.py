"""The compress stage's resume (issue 20): killed with SIGKILL mid-run, it resumes bit for bit. The masks are rebuilt
from the resumed weights' zeros and SnC's snapshot taken before the kill is read back from disk; the stage's other
checks run through its DAG (tests/dags/test_compress_dag.py)."""
from __future__ import annotations

import json
import signal

import pytest

from tests.support.compress import command, compress
from tests.support.layouts import losses
from tests.support.processes import kill_after

# Six steps in three pruning steps (30%, 60%, 90% at steps 0, 2, 4; snapshots at 2 and 4), a checkpoint every step;
# the kill comes after step 3's, so the resumed run reads step 2's snapshot back and takes step 4's itself.
SETS = ("train.steps=6", "pruning.stages=3", "train.save_interval=1")
METRICS = ("cap_loss", "lm_loss", "prc_loss", "fic_loss", "snc_loss", "sparsity")


@pytest.mark.extended
@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_compress_killed_mid_run_resumes_bit_for_bit(structure, micro_teacher, chat_parent, tmp_path):
    sets = (*SETS, f"pruning.structure={structure}")
    whole = compress(tmp_path / "whole", micro_teacher, chat_parent, *sets)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    cmd = command(tmp_path / "cut", micro_teacher, chat_parent, *sets)
    rc = kill_after(cmd, "compress: saved iter_0000003", tmp_path / "killed.log")
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = compress(tmp_path / "cut", micro_teacher, chat_parent, *sets)
    assert "resumed from step 3" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "pruning resumed at sparsity 0.600 with 1 snapshots" in resumed.stdout
    for metric in METRICS:
        after, uninterrupted = losses(tmp_path / "cut", metric), losses(tmp_path / "whole", metric)
        assert sorted(after) == [4, 5, 6] and [after[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]
    outputs = [json.loads((tmp_path / run / "compress" / "manifest.json").read_text())["outputs"]["pruning"]
               for run in ("whole", "cut")]
    assert outputs[0] == outputs[1] and outputs[0]["snapshot_steps"] == [2, 4]
