"""Does sft teach the tiny profile its task suite? (issue 17, "SFT learns") Held-out exact match before and after.

Per seed, through the real stages (`python -m training ... --preset tiny`, one curated corpus for all seeds):
  base   pretrain (the preset: 300 steps of 8 x 64 tokens)
  sft    the preset's sft from that release (the task suite's train split, the preset's epochs: tiny's four)
Both are scored by the evaluate stage's `tasks` suite on the held-out split (prompts in DeepSeek-V3's chat template,
greedy replies, exact checkers), on the preset's tasks and, with --all-tasks, on every generated task but `code`.
With --child-tuning it then fine-tunes each seed's base again with Child-Tuning_F and _D (Xu et al. 2021; p = 0.3)
and prints the three held-out accuracies side by side.
Printed per seed: accuracy before and after (per task), the gain in points, sft's wall time; then the claim's verdict:
a gain of at least 30 points on the preset's own suite (the tasks its sft trains on) on every seed. Every number is
printed; nothing is tuned here.

    .venv/bin/python benchmarks/sft_learning.py [--seeds 1 2 3] [--out DIR] [--all-tasks] [--report] [--child-tuning]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_runs import stage  # noqa: E402

CLAIM = 0.30   # the bar: held-out accuracy at least 30 points above the base model's
OTHER_SUITES = [f"{suite}.enabled=false" for suite in ("humaneval", "fim", "passkey", "arith", "perplexity")]


def tracking(run_root: Path) -> str:
    return f"tracking.uri=sqlite:///{run_root}/mlflow.db"


def scores(root: Path, name: str, release: Path, seed: int, tasks: list[str]) -> dict[str, float]:
    stage("evaluate", root, tracking(root), f"seed={seed}", f"name={name}", f"checkpoint={release}", *OTHER_SUITES,
          "tasks.enabled=true", f"tasks.tasks=[{','.join(tasks)}]", "tasks.heldout_items=100")
    metrics = json.loads((root / name / "results.json").read_text())["metrics"]
    return {k.removeprefix("tasks."): v for k, v in metrics.items()
            if k.startswith("tasks.") and k.endswith("accuracy")}


def run_seed(seed: int, out: Path, corpus: Path, tasks: list[str]) -> dict:
    root = out / f"seed{seed}"
    pretrain_s = stage("pretrain", root, tracking(root), f"seed={seed}", f"data_manifest={corpus}")
    base = root / "pretrain" / "release"
    sft_s = stage("sft", root, tracking(root), f"seed={seed}", f"init_checkpoint={base}")
    steps = json.loads((root / "sft" / "manifest.json").read_text())["metrics"]["steps"]
    return {"seed": seed, "before": scores(root, "evaluate_base", base, seed, tasks),
            "after": scores(root, "evaluate_sft", root / "sft" / "release", seed, tasks),
            "seconds": {"pretrain": pretrain_s, "sft": sft_s}, "sft_steps": steps}


def child_tuning_seed(seed: int, out: Path, tasks: list[str]) -> dict:
    """Held-out accuracy of sft and of sft with Child-Tuning_F and _D (the paper's p = 0.3) from the seed's base."""
    root = out / f"seed{seed}"
    base = root / "pretrain" / "release"
    accuracy = {"sft": scores(root, "evaluate_sft_suite", root / "sft" / "release", seed, tasks)["accuracy"]}
    for mode in ("task_free", "task_driven"):
        stage("sft", root, tracking(root), f"seed={seed}", f"init_checkpoint={base}", f"name=sft_{mode}",
              f"child_tuning.mode={mode}")
        accuracy[mode] = scores(root, f"evaluate_sft_{mode}", root / f"sft_{mode}" / "release", seed,
                                tasks)["accuracy"]
    print(f"seed {seed}: held-out accuracy ({', '.join(tasks)}) sft {accuracy['sft']:.2f}, Child-Tuning_F "
          f"{accuracy['task_free']:.2f}, Child-Tuning_D {accuracy['task_driven']:.2f}", flush=True)
    return {"seed": seed, **accuracy}


def report(result: dict) -> None:
    before, after = result["before"], result["after"]
    cells = ", ".join(f"{k.removesuffix('_accuracy')} {before[k]:.2f} -> {after[k]:.2f}" for k in sorted(after)
                      if k != "accuracy")
    print(f"seed {result['seed']}: held-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f} "
          f"({100 * (after['accuracy'] - before['accuracy']):+.0f} points; {cells}); sft {result['sft_steps']} steps "
          f"in {result['seconds']['sft']:.0f} s, pretrain {result['seconds']['pretrain']:.0f} s", flush=True)


def suite_gain(result: dict, tasks: list[str]) -> float:
    """Points gained on the preset's own task suite: the mean of its tasks' held-out accuracies, after - before."""
    mean = lambda side: sum(result[side][f"{t}_accuracy"] for t in tasks) / len(tasks)   # noqa: E731
    return mean("after") - mean("before")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-sft")
    parser.add_argument("--all-tasks", action="store_true", help="score sort, add, reverse and countdown too")
    parser.add_argument("--report", action="store_true", help="print the results.json of an earlier run; run nothing")
    parser.add_argument("--child-tuning", action="store_true", help="after the seeds' runs: sft vs Child-Tuning_F vs "
                                                                    "_D from the same bases (child_tuning.json)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from training.config import resolve_stage_config

    suite = list(resolve_stage_config("sft", "tiny").tasks.tasks)
    tasks = sorted(set(suite) | {"sort", "add", "reverse", "countdown"}) if args.all_tasks else suite
    out = args.out.resolve()
    if args.report:
        results = json.loads((out / "results.json").read_text())
    else:
        if not (out / "corpus" / "curate" / "manifest.json").is_file():
            stage("curate", out / "corpus", tracking(out / "corpus"))
        results = []
        for seed in args.seeds:
            results.append(run_seed(seed, out, out / "corpus" / "curate", tasks))
            report(results[-1])
        (out / "results.json").write_text(json.dumps(results, indent=2))
    for result in results if args.report else []:
        report(result)
    if args.child_tuning:
        compared = [child_tuning_seed(r["seed"], out, suite) for r in results]
        (out / "child_tuning.json").write_text(json.dumps(compared, indent=2))
    gains = [suite_gain(r, suite) for r in results]
    holds = "holds on every seed" if min(gains) >= CLAIM else "does NOT hold on every seed"
    points = ", ".join(f"{100 * g:+.0f} points" for g in gains)
    print(f"gain on the preset's suite ({', '.join(suite)}) per seed: {points}; the >= {100 * CLAIM:.0f}-point claim "
          f"{holds}; results: {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
