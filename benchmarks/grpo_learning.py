"""Does GRPO teach the tiny profile? (issue 18, "RL works (R1)") Held-out accuracy of the cold-start model, then of
the GRPO policy trained from it, per seed.

Per seed, through the real stages (`python -m training ... --preset tiny`; the bases are pretrained here, or reused
from an sft_learning.py run with --bases DIR):
  base         pretrain (the preset)
  cold start   sft from the base on the task suite's train split written as reasoning turns (`sft.reasoning`: a
               worked solution in <think> before the answer; R1 §2.3.1), `--cold-start-items` items per task (the
               tiny sft's 8,000; 2,000 left the sampled accuracy near 0, so GRPO had nothing to reinforce), V3 §5.1's
               two epochs
  grpo         the tiny preset's grpo from the cold-start release with R1's reasoning format (`format=r1`: the reply
               opens in <think>, the answer follows </think>; no R1-Zero instruction), format + accuracy rewards,
               `--grpo-steps` steps
Each release is scored by the evaluate stage's `tasks` suite on the held-out split (greedy, exact checkers, 64 new
tokens: room for the reasoning). Per seed it prints both accuracies, the gain in points, GRPO's wall time and its
reward/format/KL at the first and last logged steps (the curves are in each run's MLflow store, `mlflow.db`). Every
number is printed; nothing is tuned here.

    .venv/bin/python benchmarks/grpo_learning.py [--seeds 1 2 3] [--out DIR] [--bases DIR | --cold-starts DIR]
                                                 [--grpo-steps N] [--report]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from sft_learning import tracking  # noqa: E402
from stage_runs import stage  # noqa: E402

CLAIM = 0.15   # the bar: GRPO raises held-out accuracy by at least 15 points over the cold-start model
OTHER_SUITES = [f"{suite}.enabled=false" for suite in ("humaneval", "fim", "passkey", "arith", "perplexity")]
R1_FORMAT = ["format=r1", "system_prompt=null", "max_new_tokens=48"]   # 15-token prompts + <think> + 48 < 192


def accuracy(root: Path, name: str, release: Path, seed: int, tasks: list[str]) -> float:
    stage("evaluate", root, tracking(root), f"seed={seed}", f"name={name}", f"checkpoint={release}", *OTHER_SUITES,
          "tasks.enabled=true", f"tasks.tasks=[{','.join(tasks)}]", "tasks.heldout_items=100",
          "tasks.max_new_tokens=64")
    return json.loads((root / name / "results.json").read_text())["metrics"]["tasks.accuracy"]


def curve(root: Path, run_name: str) -> dict[str, list[float]]:
    """reward, format rate and KL per logged step of the newest MLflow run of stage `run_name` under `root`."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("seekflow")
    runs = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
            if r.info.run_name == run_name or r.data.tags.get("seekflow.stage") == run_name]
    return {metric: [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, metric),
                                             key=lambda m: m.step)]
            for metric in ("reward", "format_rate", "accuracy", "kl")}


def run_seed(seed: int, out: Path, bases: Path | None, tasks: list[str], items: int, steps: int,
             cold_starts: Path | None = None) -> dict:
    root = out / f"seed{seed}"
    if cold_starts:   # an earlier run's cold-start release of this seed: GRPO (and both scores) only
        cold = cold_starts / f"seed{seed}" / "sft_cold_start" / "release"
        return grpo_and_scores(seed, root, cold, tasks, steps, {})
    base = (bases / f"seed{seed}" / "pretrain" / "release") if bases else root / "pretrain" / "release"
    if not (base / "manifest.json").exists() and not bases:
        if not (out / "corpus" / "curate" / "manifest.json").is_file():
            stage("curate", out / "corpus", tracking(out / "corpus"))
        stage("pretrain", root, tracking(root), f"seed={seed}", f"data_manifest={out / 'corpus' / 'curate'}")
    seconds = {"cold_start": stage("sft", root, tracking(root), f"seed={seed}", "name=sft_cold_start",
                                   f"init_checkpoint={base}", "reasoning=true", f"tasks.train_items={items}",
                                   "epochs=2")}
    return grpo_and_scores(seed, root, root / "sft_cold_start" / "release", tasks, steps, seconds)


def grpo_and_scores(seed: int, root: Path, cold: Path, tasks: list[str], steps: int, seconds: dict) -> dict:
    seconds["grpo"] = stage("grpo", root, tracking(root), f"seed={seed}", "name=grpo_reasoning",
                            f"init_checkpoint={cold}", *R1_FORMAT, f"train.steps={steps}", "train.save_interval=100")
    return {"seed": seed, "cold_start": accuracy(root, "evaluate_cold_start", cold, seed, tasks),
            "grpo": accuracy(root, "evaluate_grpo", root / "grpo_reasoning" / "release", seed, tasks),
            "seconds": seconds, "curve": curve(root, "grpo_reasoning")}


def report(result: dict) -> None:
    c = result["curve"]
    ends = {k: (f"{v[0]:.3f} -> {v[-1]:.3f}" if v else "none") for k, v in c.items()}
    print(f"seed {result['seed']}: held-out accuracy cold start {result['cold_start']:.2f} -> grpo "
          f"{result['grpo']:.2f} ({100 * (result['grpo'] - result['cold_start']):+.0f} points); grpo "
          f"{result['seconds']['grpo']:.0f} s; first -> last logged step: reward {ends['reward']}, format "
          f"{ends['format_rate']}, accuracy {ends['accuracy']}, kl {ends['kl']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-grpo")
    parser.add_argument("--bases", type=Path, help="reuse the pretrained bases of an sft_learning.py run (its --out)")
    parser.add_argument("--cold-start-items", type=int, default=8000, help="cold-start records per task (R1 "
                                                                          "§2.3.1: thousands; the tiny sft's 8,000)")
    parser.add_argument("--cold-starts", type=Path, help="reuse the cold-start releases of an earlier run (its "
                                                           "--out): GRPO and the scores only")
    parser.add_argument("--grpo-steps", type=int, default=400, help="~20 minutes on 2 cores (the issue's budget)")
    parser.add_argument("--report", action="store_true", help="print the results.json of an earlier run; run nothing")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from training.config import resolve_stage_config

    tasks = list(resolve_stage_config("grpo", "tiny").tasks.tasks)
    out = args.out.resolve()
    if args.report:
        results = json.loads((out / "results.json").read_text())
        for result in results:
            report(result)
    else:
        results = []
        for seed in args.seeds:
            results.append(run_seed(seed, out, args.bases, tasks, args.cold_start_items, args.grpo_steps,
                                    args.cold_starts))
            report(results[-1])
            (out / "results.json").write_text(json.dumps(results, indent=2))
    gains = [r["grpo"] - r["cold_start"] for r in results]
    holds = "holds on every seed" if min(gains) >= CLAIM else "does NOT hold on every seed"
    print(f"gain per seed: {', '.join(f'{100 * g:+.0f} points' for g in gains)}; the >= {100 * CLAIM:.0f}-point "
          f"claim {holds}; results: {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
