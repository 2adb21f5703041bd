"""The evaluate stage: config, bad input refused before any work, and end to end on the version that the suite's
end-to-end pipeline run registered (the `pipeline_run` fixture), against its real MLflow server."""
from __future__ import annotations

import json

import pytest

from tests.support.processes import free_port, run_training
from training.__main__ import main as cli
from training.config import ConfigError, EvaluateConfig, PipelineConfig, resolve_stage_config
from training.registry import RegistryError
from training.stages import evaluate
from training.stages.evaluate import EvaluateError


# ------------------------------------------------------------------------------------------------------ config --
def test_dry_run_prints_the_resolved_config(capsys):
    assert cli(["evaluate", "--preset", "tiny", "--dry-run", "--set", "humaneval.max_problems=3"]) == 0
    out = capsys.readouterr().out
    assert "max_problems: 3" in out and "context_lengths:" in out and "checkpoint: null" in out


@pytest.mark.parametrize("override,message", [
    (["humaneval.samples_per_problem=4"], "temperature"),
    (["humaneval.ks=[1,5]", "humaneval.samples_per_problem=2", "humaneval.temperature=0.8"], "every k"),
    (["passkey.depths=[0.5,1.5]"], "depths"),
    (["passkey.context_lengths=[16]"], "at least 64"),
    (["checkpoint=models:/seekflow-evaltest"], "models:/<name>/<version>"),
    (["model_version=seekflow-evaltest/1"], "model_version"),
    (["fim.num_spans=0"], "fim.num_spans"),
    (["arith.operations=['/']"], "arith.operations"),
])
def test_invalid_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_stage_config("evaluate", "tiny", overrides=override)


def test_pipeline_has_an_evaluate_section_with_shared_fields():
    pipeline = PipelineConfig.model_validate({"run_root": "/tmp/r", "seed": 9, "evaluate": {"batch_size": 2}})
    stage = pipeline.stage("evaluate")
    assert isinstance(stage, EvaluateConfig) and (stage.run_root, stage.seed, stage.batch_size) == ("/tmp/r", 9, 2)


# ------------------------------------------------------------------------------------------- bad input, no work --
def _cfg(tmp_path, **extra) -> EvaluateConfig:
    return resolve_stage_config("evaluate", "tiny", overrides={
        "run_root": str(tmp_path / "run"), "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", **extra})


def _fake_release(path, max_positions=512):
    from training import integrity
    from training.config import ModelConfig
    from training.model.release import write_model_config

    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    write_model_config(path, ModelConfig(max_position_embeddings=max_positions))
    integrity.seal(path)
    return path


def _nothing_written(tmp_path):
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "run" / "evaluate" / "manifest.json").exists()


def test_missing_checkpoint_fails_before_any_work(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        evaluate.run(_cfg(tmp_path, checkpoint=str(tmp_path / "nope")))
    _nothing_written(tmp_path)


def test_default_checkpoint_needs_a_finished_pretrain(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain"):
        evaluate.run(_cfg(tmp_path))
    _nothing_written(tmp_path)


def test_torn_checkpoint_is_refused(tmp_path):
    release = _fake_release(tmp_path / "release")
    (release / "metadata.json").unlink()
    with pytest.raises(RegistryError, match="incomplete: metadata.json is missing"):
        evaluate.run(_cfg(tmp_path, checkpoint=str(release)))
    _nothing_written(tmp_path)


def test_settings_that_do_not_fit_the_model_are_refused(tmp_path):
    release = _fake_release(tmp_path / "release", max_positions=200)
    with pytest.raises(EvaluateError, match=r"passkey.context_lengths \[128, 256\].*max_position_embeddings 200"):
        evaluate.run(_cfg(tmp_path, checkpoint=str(release)))
    _nothing_written(tmp_path)


def test_unreachable_tracking_server_fails_fast(tmp_path):
    release = _fake_release(tmp_path / "release")
    cfg = _cfg(tmp_path, checkpoint=str(release), **{"tracking.uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(RegistryError, match="tracking server .* is unreachable"):
        evaluate.run(cfg)
    assert not (tmp_path / "run" / "evaluate" / "manifest.json").exists()


# -------------------------------------------------------------------------------------------------- end to end --
QUICK_EVAL = [arg for setting in ("humaneval.max_problems=3", "humaneval.max_new_tokens=16", "fim.num_spans=4",
                                   "passkey.context_lengths=[128]", "passkey.depths=[0.5]", "passkey.trials=1",
                                   "arith.num_problems=4", "perplexity.max_documents=4", "perplexity.max_tokens=256")
              for arg in ("--set", setting)]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _eval_cfg(root: list[str], *extra: str) -> EvaluateConfig:
    """The config `python -m training evaluate --preset tiny <root> <extra>` resolves to (same hash)."""
    args = [*root, *extra]
    return resolve_stage_config("evaluate", "tiny", overrides=[args[i + 1] for i in range(0, len(args), 2)])


@pytest.mark.slow
def test_evaluate_a_registered_version(pipeline_run, tmp_path):
    mlflow_server = pipeline_run["mlflow"]
    root = ["--set", f"run_root={tmp_path}", "--set", f"tracking.uri={mlflow_server}"]

    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    number = client.get_model_version_by_alias("seekflow-tiny", "candidate").version
    before = [(m.name, len(client.search_model_versions(f"name = '{m.name}'")))
              for m in client.search_registered_models()]
    with pytest.raises(RegistryError, match="no such registered model version"):
        evaluate.run(_eval_cfg(root, "--set", "checkpoint=models:/seekflow-tiny@nope"))
    assert [(m.name, len(client.search_model_versions(f"name = '{m.name}'")))
            for m in client.search_registered_models()] == before

    out = _ok(run_training("evaluate", "--preset", "tiny", *root, "--set",
                           "checkpoint=models:/seekflow-tiny@candidate", *QUICK_EVAL))
    result = json.loads(out.stdout.split("SEEKFLOW_RESULT ", 1)[1].splitlines()[0])
    assert result["model_version"] == f"models:/seekflow-tiny/{number}"
    assert 0.0 <= result["humaneval.pass_at_1"] <= 1.0 and result["perplexity.stdlib_code"] > 1.0

    manifest = json.loads((tmp_path / "evaluate" / "manifest.json").read_text())
    assert manifest["inputs"]["checkpoint"] == f"models:/seekflow-tiny/{number}"
    metrics = manifest["metrics"]
    assert metrics["humaneval.problems"] == 3 and metrics["fim.problems"] == 4 and metrics["passkey.problems"] == 1
    assert metrics["humaneval.passed"] + metrics["humaneval.failed"] + metrics["humaneval.timeout"] == 3

    run = client.get_run(manifest["outputs"]["mlflow_run_id"])
    assert run.data.tags["seekflow.stage"] == "evaluate"
    for key in ("eval/humaneval/pass_at_1", "eval/fim/exact_match", "eval/passkey/accuracy_len128",
                "eval/arith/accuracy", "eval/perplexity/stdlib_docstrings", "eval/perplexity/stdlib_code"):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/perplexity/stdlib_code"] == pytest.approx(metrics["perplexity.stdlib_code"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/results.json", "eval/summary.md", "eval/summary.csv", "eval/items.json"} <= artifacts
    items = json.load(open(client.download_artifacts(run.info.run_id, "eval/items.json", str(tmp_path))))
    assert len(items["data"]) == 3 + 4 + 1 + 4 and "prediction" in items["columns"]

    version = client.get_model_version("seekflow-tiny", number)
    assert float(version.tags["seekflow.eval.humaneval.pass_at_1"]) == result["humaneval.pass_at_1"]
    assert version.tags["seekflow.eval.run_id"] == run.info.run_id
    assert "seekflow.eval.perplexity.stdlib_code" in version.tags

    # A rerun of the same config on the same version is skipped before any model is loaded.
    again = evaluate.run(_eval_cfg(root, "--set", "checkpoint=models:/seekflow-tiny@candidate", *QUICK_EVAL))
    assert again == manifest
