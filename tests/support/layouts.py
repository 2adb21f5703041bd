"""The pretrain stage per parallel layout, as the layout tests run it: the micro preset with 4 layers for 4 steps on
one global batch of 4 sequences, under torchrun when more than one process. Losses come from the runs' MLflow stores
(full float precision)."""
from __future__ import annotations

import subprocess
import sys

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import REPO, repo_env, run_python, torchrun

STEPS = 4
LAYERS = 4   # dense layer 1, MoE layers 2-4, then the MTP module (itself MoE)
LAYOUTS = {   # name: (processes, overrides)
    "EP2": (2, ["parallel.expert_model_parallel_size=2"]),
    "PP2": (2, ["parallel.pipeline_model_parallel_size=2", "parallel.decoder_first_pipeline_num_layers=3"]),
    # interleaved 1F1B: rank 0 holds layers 1 and 3, rank 1 layers 2 and 4 + MTP + head
    "PP2xVPP2": (2, ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]),
    "TP2+SP": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "DP2+DistOpt": (2, ["parallel.use_distributed_optimizer=true"]),
    "PP2xEP2": (4, ["parallel.pipeline_model_parallel_size=2", "parallel.decoder_first_pipeline_num_layers=2",
                    "parallel.expert_model_parallel_size=2"]),
    # each rank holds 2 of the sequence's 4 chunks; attention all-gathers keys and values (attention.py). With
    # selective recompute: the attention (so the gathered keys and values are not kept), norms, MLA up-projections.
    "CP2": (2, ["parallel.context_parallel_size=2", "parallel.recompute=[core_attn,layernorm,mla_up_proj]"]),
    "CP2xDP2xEP2": (4, ["parallel.context_parallel_size=2", "parallel.expert_model_parallel_size=2"]),
}


def command(run_root, corpus_root, nproc: int, *overrides: str) -> list[str]:
    """`python -m training pretrain` (under torchrun when nproc > 1) for one layout run; its MLflow store is
    seeded under `run_root` (tests/support/mlflow_store.py)."""
    launcher = torchrun(nproc) if nproc > 1 else []
    sets = [f"run_root={run_root}", f"data_manifest={corpus_root}/curate", f"model.num_layers={LAYERS}",
            f"train.steps={STEPS}", "train.save_interval=100", f"tracking.uri={sqlite_store(run_root)}",
            *overrides]
    cmd = [sys.executable, "-W", "ignore", *launcher, "-m", "training", "pretrain", "--preset", "micro"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run(cmd, check: bool = True) -> subprocess.CompletedProcess:
    """Run a layout command; `check`: assert it succeeded."""
    if "torch.distributed.run" in cmd:   # torchrun starts the worker processes itself
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=repo_env())
    else:                                # [python, -W, ignore, -m, training, ...]: forked from the zygote
        out = run_python(*cmd[3:])
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_root, metric: str = "lm_loss") -> dict[int, float]:
    """step -> `metric` of the newest MLflow run under `run_root`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id],
                              order_by=["attributes.start_time DESC"])
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, metric)}


def rerun_from_step_2(run_root, cmd: list[str]) -> dict[int, float]:
    """Rerun a finished 4-step `command` (saving every 2 steps) as if its job had died right after the step-2 save
    (the step-4 checkpoint, its marker and the manifest gone); checks that it resumed there and returns the losses
    of the rerun (steps 3 and 4)."""
    import shutil

    stage = run_root / "pretrain"
    shutil.rmtree(stage / "checkpoints" / "iter_0000004")
    (stage / "checkpoints" / "latest").write_text("2")
    (stage / "manifest.json").unlink()
    rerun = run(cmd)
    assert "resumed from step 2 (8 samples consumed)" in rerun.stdout, rerun.stdout[-3000:]
    return losses(run_root)
