"""Decoding with megatron-core's GPTModel, checked against megatron's own forward (in a subprocess)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]


def test_decoder_path_matches_megatron_forward_and_batching_is_exact(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(HERE / "generate_check.py"), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["nll_max_diff"] < 1e-4
    assert report["batched_equal"], report["generated"]
    assert report["greedy_is_argmax"]
    assert all(len(g) == 6 for g in report["generated"])
