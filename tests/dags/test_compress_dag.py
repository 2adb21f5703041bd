"""seekflow_compress through `dag.test()` with the local backend, on the micro preset, against a real MLflow server:
a micro sft release named in the trigger form is pruned with CAP to 90% in two steps, scored on the held-out tasks,
registered as a model of its own with both parents, its sparsity and its non-zero parameters, and gated. One run is
shared by the checks below; the form checks need none."""
from __future__ import annotations

import json

import pytest


def _states(dagrun) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dagrun.get_task_instances()}


@pytest.fixture(scope="module")
def compressed(dagbag, micro_teacher, chat_parent, mlflow_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("compress") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        dagrun = dagbag["seekflow_compress"].test(run_conf={
            "profile": "micro", "run_root": str(run), "compress.fine_tuned": str(micro_teacher),
            "compress.pretrained": str(chat_parent)})
    return {"run": run, "states": _states(dagrun),
            "manifest": json.loads((run / "compress" / "manifest.json").read_text())}


@pytest.mark.slow
def test_compress_dag_prunes_scores_registers_and_gates(compressed, micro_teacher, chat_parent, mlflow_server):
    from mlflow import MlflowClient

    run, manifest = compressed["run"], compressed["manifest"]
    assert compressed["states"] == {name: "success" for name in (
        "validate_config", "compress", "evaluate_compress", "register_compress", "promote_compress")}
    parents = manifest["outputs"]["parents"]
    assert parents["fine_tuned"]["uri"] == str(micro_teacher) and parents["pretrained"]["uri"] == str(chat_parent)
    assert manifest["outputs"]["parent"]["uri"] == str(micro_teacher)   # the weights it started from
    pruned = manifest["outputs"]["pruning"]
    assert pruned["structure"] == "unstructured" and pruned["target_sparsity"] == 0.9
    assert pruned["snapshot_steps"] == [2]   # SnC: the model after the first pruning step
    assert (run / "compress" / "snapshots" / "step-2.safetensors").is_file()
    scores = json.loads((run / "evaluate_compress" / "manifest.json").read_text())["metrics"]
    assert 0 <= scores["tasks.accuracy"] <= 1 and "humaneval.pass_at_1" not in scores

    registered = json.loads((run / "register_compress" / "manifest.json").read_text())["outputs"]
    assert registered["model_name"] == "seekflow-micro-sparse"
    tags = MlflowClient(mlflow_server).get_model_version(registered["model_name"], registered["version"]).tags
    assert tags["seekflow.trained_by"] == "compress" and tags["seekflow.parent_ref"] == str(micro_teacher)
    assert tags["seekflow.parent.fine_tuned_ref"] == str(micro_teacher)
    assert tags["seekflow.parent.pretrained_ref"] == str(chat_parent)
    assert tags["seekflow.sparsity"] == f"{pruned['sparsity']:.6f}" and tags["seekflow.pruning"] == "unstructured"
    assert tags["seekflow.nonzero_params"] == str(pruned["nonzero_params"])
    promoted = json.loads((run / "promote_compress" / "manifest.json").read_text())["outputs"]
    assert promoted["model_name"] == "seekflow-micro-sparse" and promoted["version"] == registered["version"]


@pytest.mark.slow
def test_the_release_is_pruned_exactly_and_params_counts_its_nonzeros(compressed, capsys):
    """Every decoder matrix has exactly round(0.9 x n) zeros (per routed expert too), two optimizer steps after the
    masks last changed: Adam's moments of the newly pruned weights did not bring them back. `params --release` counts
    the release's non-zero parameters as the manifest recorded them."""
    from training.__main__ import _params
    from training.model.release import release_tensors

    release = compressed["run"] / "compress" / "release"
    matrices = 0
    for key, tensor in release_tensors(release).items():
        prunable = key.startswith("decoder.layers.") and key.endswith(".weight") and ".router." not in key
        if not prunable or tensor.dim() < 2:
            continue
        for matrix in (tensor if tensor.dim() == 3 else tensor[None]):   # routed experts are stored stacked
            assert int((matrix == 0).sum()) == round(0.9 * matrix.numel()), key
            matrices += 1
    assert matrices == 3 * 5 + 1 * 2 + 2 * (2 + 8 * 2)   # attention; the dense FFN; shared and 8 routed experts
    assert _params(["--release", str(release)]) == 0
    out = capsys.readouterr().out
    assert f"{compressed['manifest']['outputs']['pruning']['nonzero_params']:,} of" in out.splitlines()[0]


def test_compress_form_is_the_schema_and_rejects_what_the_config_rejects(dagbag):
    from operators.params import stage_form_fields
    from tests.support.forms import assert_form_and_config_refuse, served_params

    params = served_params(dagbag["seekflow_compress"])
    assert set(stage_form_fields("compress")) <= set(params)
    assert {"compress.fine_tuned", "compress.pretrained"} <= set(params)
    assert params.validate()["compress.pruning.sparsity"] == 0.9
    for key, value, bound in (("compress.pruning.sparsity", 1.0, "1"), ("compress.pruning.structure", "random",
                                                                        "structured"),
                              ("compress.contrastive.prc_weight", -1, "0")):
        assert_form_and_config_refuse(params, key, value, bound)


def test_compress_refuses_layouts_that_split_a_matrix_or_a_sequence():
    from training.config import ConfigError, resolve_stage_config

    for field, extra in (("tensor_model_parallel_size", ["parallel.sequence_parallel=true"]),
                         ("context_parallel_size", []), ("pipeline_model_parallel_size", ["model.num_layers=4"])):
        with pytest.raises(ConfigError, match=f"parallel.{field} must be 1 for compress"):
            resolve_stage_config("compress", "tiny", overrides=[f"parallel.{field}=2", *extra])
