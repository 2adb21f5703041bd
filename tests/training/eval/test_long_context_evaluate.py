"""The long-context outputs through the real evaluate stage (`python -m training evaluate`), on a context-extended
release (YaRN 64 -> 256, tests/training/eval/long_context_release.py): the needle-in-a-haystack grid and heatmap and
perplexity by position bucket, as metrics and as artifacts of the stage's MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import ok, run_python, run_training

HERE = Path(__file__).resolve().parent
LENGTHS, DEPTHS = [64, 128, 192], [0.0, 0.5, 1.0]
SETTINGS = ["humaneval.enabled=false", "fim.enabled=false", "arith.enabled=false",
            f"passkey.context_lengths={LENGTHS}", f"passkey.depths={DEPTHS}", "passkey.trials=1",
            "passkey.max_new_tokens=2", "perplexity.sources=[stdlib_docstrings]", "perplexity.max_documents=50",
            "perplexity.max_tokens=512",
            # every window is 256 predictions long: the model's whole extended context
            "perplexity.seq_length=256", "perplexity.position_buckets=[0,64,128,256]", "batch_size=4"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("long-context-eval")
    ok(run_python(str(HERE / "long_context_release.py"), str(root / "release")))
    args = ["evaluate", "--preset", "tiny", "--set", f"run_root={root / 'run'}", "--set",
            f"tracking.uri={sqlite_store(root)}", "--set", f"checkpoint={root / 'release'}"]
    out = ok(run_training(*args, *[a for s in SETTINGS for a in ("--set", s)]))
    manifest = json.loads((root / "run" / "evaluate" / "manifest.json").read_text())
    return {"root": root, "stdout": out.stdout, "manifest": manifest}


def test_metrics_have_the_grid_rows_and_the_position_buckets(evaluated):
    m = evaluated["manifest"]["metrics"]
    assert m["passkey.problems"] == len(LENGTHS) * len(DEPTHS)
    assert {f"passkey.accuracy_len{n}" for n in LENGTHS} | {"passkey.accuracy_depth0", "passkey.accuracy_depth0.5",
                                                             "passkey.accuracy_depth1"} <= m.keys()
    buckets = ["pos_0_64", "pos_64_128", "pos_128_256"]
    for name in buckets:
        assert m[f"perplexity.{name}"] == m[f"perplexity.stdlib_docstrings_{name}"] > 1.0
    # max_tokens 512: one full window of 256 predictions, then 256 more: every bucket is full in both
    assert [m[f"perplexity.{b}_tokens"] for b in buckets] == [128, 128, 256]
    assert sum(m[f"perplexity.{b}_tokens"] for b in buckets) == m["perplexity.stdlib_docstrings_tokens"] == 512
    pooled_nll = sum(m[f"perplexity.{b}_nll"] * m[f"perplexity.{b}_tokens"] for b in buckets) / 512
    assert pooled_nll == pytest.approx(m["perplexity.stdlib_docstrings_nll"], rel=1e-9)


def test_mlflow_run_has_the_niah_table_heatmap_and_position_table(evaluated, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(sqlite_store(evaluated["root"]))
    run = client.get_run(evaluated["manifest"]["outputs"]["mlflow_run_id"])
    for key in ("eval/passkey/accuracy", "eval/passkey/accuracy_depth0.5", "eval/perplexity/pos_64_128",
                "eval/perplexity/pos_128_256_nll", "eval/perplexity/stdlib_docstrings_pos_0_64"):
        assert key in run.data.metrics, key
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval/niah")} == {
        "eval/niah/grid.json", "eval/niah/heatmap.png"}
    def artifact(path: str) -> Path:
        return Path(client.download_artifacts(run.info.run_id, path, str(tmp_path)))

    grid = json.loads(artifact("eval/niah/grid.json").read_text())
    rows = [dict(zip(grid["columns"], row)) for row in grid["data"]]
    assert [(r["context_length"], r["depth"]) for r in rows] == [(n, d) for n in LENGTHS for d in DEPTHS]
    assert all(r["trials"] == 1 and r["accuracy"] in (0.0, 1.0) for r in rows)
    assert artifact("eval/niah/heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    positions = json.loads(artifact("eval/perplexity/positions.json").read_text())
    table = [dict(zip(positions["columns"], row)) for row in positions["data"]]
    assert [(r["source"], r["start"], r["end"]) for r in table] == [
        (source, a, b) for source in ("stdlib_docstrings", "all") for a, b in ((0, 64), (64, 128), (128, 256))]
    # The stage's own directory (published under run_root) has the heatmap and the tables in results.json.
    stage_dir = evaluated["root"] / "run" / "evaluate"
    assert (stage_dir / "niah" / "heatmap.png").is_file()
    results = json.loads((stage_dir / "results.json").read_text())
    assert set(results["tables"]) == {"niah/grid.json", "perplexity/positions.json"}
