"""The distill stage end to end on the micro preset (a real micro teacher that answers its prompts, real megatron-core
steps for the student): only correct traces are kept, the rejection rate is recorded, the student is dense, the
teacher (a path or a registered version) and the trace dataset are its lineage, a retry reuses the traces, and a
teacher that is not there fails before anything runs."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.distill import distill
from tests.support.mlflow_store import sqlite_store
from tests.support.processes import REPO, repo_env, run_training, torchrun
from training import integrity
from training.verify import tasks

ITEMS = {item.id: item for item in tasks.generate("sort", "train", 8, seed=0)}   # the micro section's prompts


@pytest.fixture(scope="module")
def teacher(micro_teacher):
    return micro_teacher


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher):
    root = tmp_path_factory.mktemp("distill")
    out = distill(root, f"teacher={teacher}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_only_correct_traces_are_kept_and_the_rejection_rate_is_recorded(distilled):
    root, stdout = distilled
    kept, rejected = _lines(root / "distill/traces/traces.jsonl"), _lines(root / "distill/traces/rejected.jsonl")
    counts = json.loads((root / "distill/manifest.json").read_text())["outputs"]["data"]["traces"]
    assert counts["sampled"] == 8 * 2 and counts["prompts"] == 8
    assert counts["kept"] + counts["duplicates"] + counts["wrong"] + counts["unfinished"] == counts["sampled"]
    assert counts["rejection_rate"] == (counts["wrong"] + counts["unfinished"]) / counts["sampled"]
    assert len(kept) == counts["kept"] > 0 and len(rejected) == counts["wrong"] + counts["unfinished"]
    for record in kept:   # checked again here, by the task checker itself
        user, reply = record["messages"]
        assert user["content"] == ITEMS[record["id"]].prompt and tasks.check(ITEMS[record["id"]], reply["content"])
    assert len({(r["id"], r["messages"][1]["content"]) for r in kept}) == len(kept)   # each reply once per prompt
    for reject in rejected:
        assert reject["reason"] == "unfinished" or not tasks.check(ITEMS[reject["id"]], reject["completion"])
    assert f"rejection rate {counts['rejection_rate']:.1%}" in stdout and "step 2/2 loss" in stdout


@pytest.mark.slow
def test_the_student_is_dense_and_its_manifest_names_the_teacher_and_the_traces(distilled, teacher):
    from training.config import ModelConfig
    from training.model.params import count_params

    root, _ = distilled
    student = ModelConfig.model_validate_json((root / "distill/release/seekflow_model.json").read_text())
    assert student.num_experts is None and student.mtp_num_layers == 0
    assert "routed_experts" not in count_params(student).parts
    manifest = json.loads((root / "distill/manifest.json").read_text())
    outputs = manifest["outputs"]
    assert outputs["parent"] == outputs["teacher"] and outputs["teacher"]["uri"] == str(teacher)
    assert outputs["teacher"]["release_sha256"] == integrity.marker_digest(teacher)
    assert outputs["init_checkpoint"] is None   # a random init
    data, traces = outputs["data"], root / "distill/traces/traces.jsonl"
    assert data["uri"] == str(traces) and data["traces_sha256"] == hashlib.sha256(traces.read_bytes()).hexdigest()
    assert data["conversations"] == data["traces"]["kept"] and data["rejected"] == 0
    assert data["sampling"]["temperature"] == 0.6 and data["sampling"]["samples_per_prompt"] == 2
    assert manifest["metrics"]["rejection_rate"] == data["traces"]["rejection_rate"]
    assert manifest["result"]["teacher"] == str(teacher)


@pytest.mark.slow
def test_a_retry_reuses_the_traces_and_a_student_on_another_vocabulary_re_encodes_them(distilled, teacher, tmp_path):
    root, _ = distilled
    shutil.copytree(root / "distill/traces", tmp_path / "distill/traces")
    out = distill(tmp_path, f"teacher={teacher}", "model.vocab_merges=100")   # 256 + 100 + 16 rows of 512
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reusing" in out.stdout and "completions from" not in out.stdout   # the teacher was not sampled again
    before = json.loads((root / "distill/manifest.json").read_text())["outputs"]["data"]
    after = json.loads((tmp_path / "distill/manifest.json").read_text())["outputs"]["data"]
    assert after["traces_sha256"] == before["traces_sha256"] and after["conversations"] == before["conversations"]
    assert after["sha256"] != before["sha256"]   # the same text in the student's own token ids


@pytest.mark.slow
def test_the_student_starts_from_a_dense_release_of_its_own_architecture_only(distilled, teacher, tmp_path):
    root, _ = distilled
    shutil.copytree(root / "distill/traces", tmp_path / "moe/distill/traces")
    out = distill(tmp_path / "moe", f"teacher={teacher}", f"init_checkpoint={teacher}")   # the MoE teacher itself
    assert out.returncode != 0 and f"init_checkpoint {teacher}: the parent's architecture differs from `model`" in \
        out.stdout + out.stderr and "model.num_experts: 8 in the checkpoint, None now" in out.stdout + out.stderr
    student = root / "distill/release"
    shutil.copytree(root / "distill/traces", tmp_path / "dense/distill/traces")
    out = distill(tmp_path / "dense", f"teacher={teacher}", f"init_checkpoint={student}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"initialised the weights from {student}" in out.stdout
    outputs = json.loads((tmp_path / "dense/distill/manifest.json").read_text())["outputs"]
    assert outputs["init_checkpoint"]["uri"] == str(student) and outputs["parent"]["uri"] == str(teacher)


@pytest.mark.slow
def test_a_registered_teacher_is_pinned_and_the_registered_student_names_it(teacher, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    teacher_root = tmp_path / "teacher"   # register writes under the run root: not in the shared teacher's
    shutil.copytree(teacher.parents[1], teacher_root, ignore=shutil.ignore_patterns("*.lock"))
    out = run_training("register", "--preset", "micro", *(arg for item in (
        f"run_root={teacher_root}", "reads.pretrain=sft", "model_name=seekflow-micro-teacher", "export_hf=false",
        f"tracking.uri={mlflow_server}") for arg in ("--set", item)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = distill(tmp_path, "teacher=models:/seekflow-micro-teacher@candidate", f"tracking.uri={mlflow_server}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parent = json.loads((tmp_path / "distill/manifest.json").read_text())["outputs"]["parent"]
    assert (parent["uri"], parent["model_name"], parent["version"]) == (
        "models:/seekflow-micro-teacher/1", "seekflow-micro-teacher", "1")
    out = run_training("register", "--preset", "micro", *(arg for item in (
        f"run_root={tmp_path}", "reads.pretrain=distill", "model_name=seekflow-micro-student", "export_hf=false",
        f"tracking.uri={mlflow_server}") for arg in ("--set", item)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_server)   # (the distill DAG test may have registered this model's first version)
    registered = json.loads((tmp_path / "register/manifest.json").read_text())["outputs"]
    version = client.get_model_version("seekflow-micro-student", registered["version"])
    assert version.tags["seekflow.parent_version"] == "seekflow-micro-teacher/1"
    assert version.tags["seekflow.parent_ref"] == "models:/seekflow-micro-teacher/1"
    assert version.tags["seekflow.trained_by"] == "distill"
    lineage = client.download_artifacts(version.run_id, "lineage/pretrain_manifest.json", str(tmp_path))
    data = json.loads(Path(lineage).read_text())["outputs"]["data"]
    assert data["uri"] == str(tmp_path / "distill/traces/traces.jsonl") and len(data["traces_sha256"]) == 64


@pytest.mark.slow
def test_two_ranks_share_the_prompts_then_train_the_student_in_its_own_layout(teacher, tmp_path):
    """Each rank samples its share of the prompts from a whole teacher; then the same processes train the student
    under tensor parallelism (megatron's groups rebuilt for it)."""
    sets = [f"run_root={tmp_path}", f"teacher={teacher}", f"tracking.uri={sqlite_store(tmp_path)}",
            "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    out = subprocess.run([sys.executable, "-W", "ignore", *torchrun(2), "-m",
                          "training", "distill", "--preset", "micro", *(a for s in sets for a in ("--set", s))],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=repo_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = json.loads((tmp_path / "distill/manifest.json").read_text())["outputs"]["data"]["traces"]
    assert (counts["prompts"], counts["sampled"]) == (8, 16) and counts["kept"] > 0
    assert len(_lines(tmp_path / "distill/traces/traces.jsonl")) == counts["kept"] and "step 2/2 loss" in out.stdout


@pytest.mark.parametrize("teacher, message", [
    ("{root}/no-such-release", "teacher: no release at {root}/no-such-release"),
    (None, "teacher: unset, and no manifest at"),
    ("models:/no-such-model@champion", "teacher: models:/no-such-model@champion: no such registered model version"),
])
def test_a_teacher_that_is_not_there_fails_before_anything_runs(tmp_path, teacher, message):
    from training import registry
    from training.config import resolve_stage_config
    from training.stages import distill as stage

    overrides = {"run_root": str(tmp_path), "tracking.uri": sqlite_store(tmp_path)}
    if teacher:
        overrides["teacher"] = teacher.format(root=tmp_path)
    with pytest.raises((stage.DistillError, registry.RegistryError)) as err:
        stage.run(resolve_stage_config("distill", "micro", overrides=overrides))
    assert str(err.value).startswith(message.format(root=tmp_path)), str(err.value)
    assert getattr(err.value, "permanent", False)   # bad input: the job is not retried
    assert not (tmp_path / "distill").exists()
