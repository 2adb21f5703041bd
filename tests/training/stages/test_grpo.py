"""The grpo stage end to end on the micro preset (real megatron-core steps from a real release, rollouts sampled by
the policy through the KV cache): it records its parent, logs the rollout and update metrics, redraws the rollout
every μ steps, keeps the expert biases with `moe_router: bias_updates_off`, resets its reference, and resumes bit for
bit after SIGKILL (the rollout redrawn from the restored weights, the reset reference read back)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.grpo import arguments, command, grpo
from tests.support.layouts import losses
from tests.support.processes import REPO, kill_after, repo_env, torchrun

METRICS = ("grpo_loss", "kl", "clip_fraction", "reward", "reward/format", "reward/accuracy", "reward/language",
           "accuracy", "format_rate", "response_length", "zero_advantage_groups", "rollout_tokens_per_s",
           "update_tokens_per_s", "rollout", "mtp_loss", "entropy", "seconds/generate", "seconds/old_logp",
           "seconds/rewards", "seconds/reference", "seconds/update")
# From the micro teacher, whose replies end (EOS) after different lengths, so expert-parallel ranks decode different
# numbers of steps; a learning rate that moves it without wrecking it (micro's 3e-3 is for the 2-step chat parent);
# the routers frozen (their weights as the parent's; the biases too, as bias_updates_off, the micro default, keeps).
TEACHER = ("moe_router=frozen", "optimizer.lr=1e-5", "optimizer.min_lr=1e-5")
# Each layout is one torchrun launch of 2 ranks, to draw and train what one process does. (EP2 is data-parallel too:
# each rank samples its share of the prompts and the shares are gathered, as under DP2.)
LAYOUTS = {"EP2": ("parallel.expert_model_parallel_size=2",),
           "PP2": ("parallel.pipeline_model_parallel_size=2", "parallel.decoder_first_pipeline_num_layers=2")}
# μ = 1, the reference replaced by the policy every 2 steps, a checkpoint every step, the biases updating.
RESETTING = ("updates_per_rollout=1", "reference_reset_steps=2", "train.save_interval=1", "train.keep_last=4",
             "moe_router=as_trained")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, micro_teacher):
    root = tmp_path_factory.mktemp("grpo")
    out = grpo(root, micro_teacher, *TEACHER)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout


@pytest.fixture(scope="module")
def resetting(tmp_path_factory, chat_parent):
    root = tmp_path_factory.mktemp("grpo-reset")
    out = grpo(root, chat_parent, *RESETTING)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out.stdout


@pytest.mark.slow
def test_grpo_trains_on_its_own_rollouts_and_records_its_lineage(uninterrupted, micro_teacher):
    root, stdout = uninterrupted
    assert f"grpo: initialised the weights from {micro_teacher}" in stdout and "step 4/4 loss" in stdout
    # μ = 2: a rollout before steps 1 and 3, none before 2 and 4
    assert "rollout 0 for steps 1-2:" in stdout and "rollout 1 for steps 3-4:" in stdout
    assert stdout.count(": rollout ") == 2
    manifest = json.loads((root / "grpo" / "manifest.json").read_text())
    assert manifest["outputs"]["parent"]["uri"] == str(micro_teacher)
    assert manifest["result"]["parent"] == str(micro_teacher)
    assert len(manifest["outputs"]["parent"]["release_sha256"]) == 64
    assert manifest["outputs"]["data"] == {"tasks": {"tasks": ["sort"], "train_items": 8, "heldout_items": 50,
                                                     "seed": 0}, "prompts": 8}
    assert {"reward", "accuracy", "kl", "clip_fraction"} <= set(manifest["metrics"])
    assert (root / "grpo" / "release" / "complete.json").is_file()

    history = {name: losses(root, name) for name in METRICS}
    for name, values in history.items():
        assert sorted(values) == [1, 2, 3, 4], name
        assert all(math.isfinite(v) for v in values.values()), (name, values)
    assert [history["rollout"][s] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert history["accuracy"] == history["reward/accuracy"] and history["format_rate"] == history["reward/format"]
    # the first update of the run is at the reference and at the sampling policy: KL 0, nothing clipped
    assert history["kl"][1] == 0.0 and history["clip_fraction"][1] == 0.0 and history["kl"][4] > 0
    assert all(0 < history["response_length"][s] <= 13 for s in history["response_length"])   # 12 new + EOS
    # frozen: the routers' weights and expert biases stay the parent's, while the rest trains
    bias = losses(root, "moe/expert_bias_norm")
    assert len(set(bias.values())) == 1, bias
    before, after = _weights(micro_teacher, root / "before.pt"), _weights(root / "grpo" / "release", root / "after.pt")
    routers = [name for name in after if name.endswith(".router.weight")]
    assert len(routers) == 3 and all(torch.equal(after[n], before[n]) for n in routers)   # 2 MoE layers + MTP's
    assert any(not torch.equal(after[n], before[n]) for n in after if ".router." not in n)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = manifest["outputs"]["mlflow_run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "grpo")] == [
        "grpo/samples_step_000000.json", "grpo/samples_step_000002.json"]
    assert client.get_run(run_id).data.tags["seekflow.init_checkpoint"] == str(micro_teacher)
    table = _table(client.download_artifacts(run_id, "grpo/samples_step_000000.json", str(root)))
    # the first rollout's two prompts (one per rank in the layout test) end at different steps: EP2 ranks must idle
    assert table["stop_reason"][:2] == ["eod", "eod"] and "max_new_tokens" in table["stop_reason"][2:], table


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param(layout, marks=[pytest.mark.extended] if layout == "PP2" else [])
                                    for layout in LAYOUTS])   # PP2: outside the 15-minute suite
def test_two_ranks_in_each_layout_draw_and_train_what_one_process_does(layout, uninterrupted, micro_teacher,
                                                                       tmp_path):
    """Under torchrun with 2 ranks: expert-parallel (and so data-parallel), each rank samples one of the 2 prompts of
    every rollout (its rows' own streams) on its half of the experts, in lockstep with the other, the shares are
    gathered, and each rank trains on its half; pipeline-parallel, both stages decode every row, passing hidden
    states on. Each draws the same rollouts as one process and trains to the same losses."""
    out = subprocess.run([sys.executable, "-W", "ignore", *torchrun(2), "-m", "training",
                          *arguments(tmp_path, micro_teacher, *TEACHER, *LAYOUTS[layout])],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=repo_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 4/4 loss" in out.stdout and out.stdout.count(": rollout ") == 2   # rank 0 reports the whole
    one, _ = uninterrupted
    for name in ("reward", "accuracy", "format_rate", "response_length", "zero_advantage_groups"):
        assert losses(tmp_path, name) == losses(one, name), name   # the same completions, scored alike
    for name in ("grpo_loss", "kl", "clip_fraction", "entropy"):   # entropy: the sampled tokens' old log-probs
        two, single = losses(tmp_path, name), losses(one, name)
        assert all(abs(two[s] - single[s]) <= 1e-5 for s in single), (name, two, single)


def _table(path) -> dict[str, list]:
    """An MLflow table artifact (`log_table`'s JSON: columns and rows) as {column: values}."""
    table = json.loads(Path(path).read_text())
    return {column: [row[i] for row in table["data"]] for i, column in enumerate(table["columns"])}


def _weights(release, scratch) -> dict:
    """A release's tensors by name, read from its dist checkpoint without megatron (PyTorch's DCP reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(release), str(scratch))
    return {k: v for k, v in torch.load(scratch, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_the_reference_is_reset_to_the_policy_and_biases_update_as_trained(resetting):
    root, stdout = resetting
    assert "the reference is now the policy of step 2" in stdout and stdout.count(": rollout ") == 4
    assert (root / "grpo" / "reference" / "step_000002.safetensors").is_file()
    kl = losses(root, "kl")
    assert kl[1] == 0.0 and kl[2] > 0 and kl[3] == 0.0 and kl[4] > 0   # step 3 updates at the fresh reference
    assert len(set(losses(root, "moe/expert_bias_norm").values())) > 1   # as_trained: the biases move


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_ends_on_the_uninterrupted_run(resetting, chat_parent, tmp_path):
    # killed after step 3's checkpoint: the resume reads the reference of step 2 back and redraws step 4's rollout
    rc = kill_after(command(tmp_path, chat_parent, *RESETTING), "grpo: saved iter_0000003", tmp_path / "killed.log")
    killed = (tmp_path / "killed.log").read_text()
    assert rc == -signal.SIGKILL and "step 4/4" not in killed, killed[-3000:]
    resumed = grpo(tmp_path, chat_parent, *RESETTING)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout and "rollout 3 for steps 4-4" in resumed.stdout
    for name in ("grpo_loss", "kl", "reward", "grad_norm"):
        after, whole = losses(tmp_path, name), losses(resetting[0], name)
        assert sorted(after) == [4] and after[4] == whole[4], name   # bit for bit
