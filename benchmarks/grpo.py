"""Where a GRPO step's time goes, and what the KL penalty holds (issue 18): short runs of the real grpo stage
(`python -m training grpo --preset tiny`) from one release, read back from their MLflow stores.

1. Time shares: one run with the preset's β; per step, the stage logs `seconds/generate` (sampling the rollout
   through the KV cache), `seconds/old_logp` (the sampling policy's log-probs of the rollout: π_θold),
   `seconds/rewards` (the rule rewards), `seconds/reference` (the frozen reference's log-probs) and
   `seconds/update` (the megatron step on the rollout). Printed: each phase's mean seconds and share of their sum.
2. KL: the same steps with β = 0.04 (DeepSeekMath §4.2) and β = 0 (`track_kl`: the reference is still loaded and the
   k3 KL logged, the loss does not see it). Printed: the KL at every logged step of both, and each run's mean and
   max over the second half.

Nothing is timed against a threshold; these are one run's numbers on this machine.

    .venv/bin/python benchmarks/grpo.py --init RELEASE [--steps 40] [--out DIR] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from sft_learning import tracking  # noqa: E402
from stage_runs import stage  # noqa: E402

PHASES = ("generate", "old_logp", "rewards", "reference", "update")


def history(root: Path, metrics: tuple[str, ...]) -> dict[str, list[float]]:
    """Each metric's values by step, from the newest run of the MLflow store under `root`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("seekflow")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    return {name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
            for name in metrics}


def grpo(root: Path, init: Path, steps: int, *sets: str) -> dict[str, list[float]]:
    stage("grpo", root, tracking(root), f"init_checkpoint={init}", f"train.steps={steps}", "train.log_interval=1",
          f"train.save_interval={steps}", *sets)
    return history(root, (*(f"seconds/{p}" for p in PHASES), "kl", "reward"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True, help="the release to start from (e.g. a cold-start sft "
                                                                 "release of benchmarks/grpo_learning.py)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-grpo-steps")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more grpo overrides (key=value)")
    args = parser.parse_args()
    out = args.out.resolve()

    timed = grpo(out / "preset_beta", args.init, args.steps, *args.sets)
    means = {p: sum(timed[f"seconds/{p}"]) / len(timed[f"seconds/{p}"]) for p in PHASES}
    total = sum(means.values())
    print(f"a GRPO step's time ({args.steps} steps, the preset's beta): "
          + ", ".join(f"{p} {means[p]:.2f}s ({means[p] / total:.0%})" for p in PHASES) + f"; sum {total:.2f}s")

    kl = {beta: grpo(out / f"beta_{beta}", args.init, args.steps, f"beta={beta}", "track_kl=true", *args.sets)["kl"]
          for beta in (0.04, 0.0)}
    for beta, values in kl.items():
        late = values[len(values) // 2:]
        print(f"beta {beta}: kl per step {' '.join(f'{v:.4f}' for v in values)}; second half mean "
              f"{sum(late) / len(late):.4f} max {max(late):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
