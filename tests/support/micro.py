"""The `micro` preset (tests/support/presets/micro.yaml): the tiny architecture with a 512-token vocabulary, trained
on synthetic token streams. Mechanics tests (checkpoints, resume, schedules, routing, metrics) run on it."""
from __future__ import annotations

from training.data.synthetic import write_synthetic_curate

from tests.support.mlflow_store import sqlite_store
from tests.support.processes import run_training

VOCAB = 512


def write_corpus(run_root, documents: int = 200) -> None:
    """A curate manifest over patterned token streams (learnable, vocabulary 512) at `{run_root}/curate`."""
    write_synthetic_curate(run_root, vocab_size=VOCAB, documents=documents)


# A batch-size ramp 2 → 4 over the first 6 samples (192 tokens): steps take 2, 2, 2, then 4 sequences (megatron's
# calculator: start + increment x int(consumed / 6) until consumed > 6). Checkpoints are written in the background.
RAMP = ["train.batch_size_rampup.start_batch_size=2", "train.batch_size_rampup.batch_size_increment=2",
        "train.batch_size_rampup.ramp_tokens=192", "train.async_save=true"]


def pretrain(run_root, steps, *extra, ramp: bool = False, env: dict | None = None):
    """The micro preset for `steps` steps on the corpus under `run_root` (`ramp`: with the batch-size ramp and async
    saves): 4 x 32-token batches, lr warm-up 1 step, progress every step, a checkpoint every 2 steps."""
    extra = [arg for item in RAMP for arg in ("--set", item)] * ramp + list(extra)
    return run_training(
        "pretrain", "--preset", "micro", "--set", f"run_root={run_root}", "--set", f"train.steps={steps}",
        "--set", f"tracking.uri={sqlite_store(run_root)}", "--set", "tracking.tags.dag_run_id=test-run",
        *extra, env=env)


TOKENS_PER_STEP = 4 * 32   # the micro preset's global_batch_size x seq_length


def mlflow_run(run_root):
    """(client, run): the newest MLflow run in `{run_root}/mlflow.db`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id],
                              order_by=["attributes.start_time DESC"])
    return client, runs[0]


def history(client, run, key) -> dict[int, float]:
    """step -> value of the metric `key` in `run`."""
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
