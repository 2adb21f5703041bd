"""The sft stage end to end on the micro preset (real megatron-core steps from a real release): it fine-tunes on the
generated task suite with the loss on assistant tokens only, records its parent and data, resumes bit for bit after
SIGKILL, and sets bad records aside (failing, naming the file, past the limit)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.support.layouts import losses
from tests.support.processes import REPO, kill_after, repo_env
from tests.support.sft import command, sft


@pytest.fixture(scope="module")
def parent(chat_parent):
    return chat_parent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, parent):
    root = tmp_path_factory.mktemp("sft")
    out = sft(root, parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout


def test_loss_mask_learns_assistant_tokens_only():
    out = subprocess.run([sys.executable, "-W", "ignore", str(REPO / "tests/training/train/loss_mask_probe.py")],
                         capture_output=True, text=True, cwd=REPO, env=repo_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["masked_positions"] > probe["learned_positions"] > 0 and probe["eod_learned"] == 2
    assert probe["same_loss_when_prompt_labels_change"] and probe["same_grads_when_prompt_labels_change"]
    assert probe["loss_changes_with_a_learned_label"] and probe["grads_change_with_a_learned_label"]


@pytest.mark.slow
def test_sft_fine_tunes_the_parent_on_the_task_suite_and_records_its_lineage(uninterrupted, parent):
    root, stdout = uninterrupted
    assert f"sft: initialised the weights from {parent}" in stdout and "step 4/4 loss" in stdout
    assert "sft: 24 conversations in" in stdout
    manifest = json.loads((root / "sft" / "manifest.json").read_text())
    assert manifest["outputs"]["parent"]["uri"] == str(parent) and manifest["result"]["parent"] == str(parent)
    data = manifest["outputs"]["data"]
    assert data["generated"] and data["conversations"] == 24 and data["rejected"] == 0 and len(data["sha256"]) == 64
    records = [json.loads(line) for line in (root / "sft" / "data" / "tasks_train.jsonl").read_text().splitlines()]
    assert len(records) == 24 and all(r["task"] == "sort" for r in records)
    assert (root / "sft" / "release" / "complete.json").is_file()


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_ends_on_the_uninterrupted_loss(uninterrupted, parent, tmp_path):
    rc = kill_after(command(tmp_path, parent), "sft: saved iter_0000002", tmp_path / "killed.log")
    killed = (tmp_path / "killed.log").read_text()
    assert rc == -signal.SIGKILL and "step 4/4" not in killed, killed[-3000:]
    resumed = sft(tmp_path, parent)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    after, whole = losses(tmp_path), losses(uninterrupted[0])
    assert sorted(after) == [3, 4] and [after[3], after[4]] == [whole[3], whole[4]]   # bit for bit


def _write_chat_data(folder, good: int, bad_lines: list[bytes]):
    folder.mkdir()
    line = json.dumps({"messages": [{"role": "user", "content": "Sort ascending: 2 1"},
                                    {"role": "assistant", "content": "1 2"}]}).encode()
    (folder / "chat.jsonl").write_bytes(b"\n".join([line] * good + bad_lines) + b"\n")
    return folder


BAD = [b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
       b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
       b'{"messages": [{"role": "user", "content": "hi"}]}',
       b'{"messages": [{"role": "user", "content": "' + b"word " * 200 + b'"}, {"role": "assistant", "content": "x"}]}',
       b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',
       b'{"messages": [{"role": "user"']


@pytest.mark.slow
def test_bad_records_are_set_aside_with_their_reason_and_the_stage_completes(parent, tmp_path):
    data = _write_chat_data(tmp_path / "data", good=60, bad_lines=BAD)
    out = sft(tmp_path / "run", parent, f"data={data}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["outputs"]["data"]["dropped"] == {
        "empty_assistant": 1, "invalid_utf8": 1, "malformed_json": 1, "missing_assistant": 1, "too_long": 1,
        "unknown_role": 1}
    rejects = [json.loads(x) for x in (tmp_path / "run" / "sft" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(manifest["outputs"]["data"]["dropped"])


def test_a_file_over_the_reject_limit_fails_naming_it(parent, tmp_path):
    data = _write_chat_data(tmp_path / "data", good=4, bad_lines=BAD)
    out = sft(tmp_path / "run", parent, f"data={data}")
    assert out.returncode != 0
    assert f"{data / 'chat.jsonl'}" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["task_free", "task_driven"])
def test_sft_runs_with_child_tuning(parent, tmp_path, mode):
    out = sft(tmp_path, parent, f"child_tuning.mode={mode}", "child_tuning.fisher_batches=2", "train.steps=2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2 loss" in out.stdout
    assert ("Child-Tuning_D child network:" in out.stdout) == (mode == "task_driven")
