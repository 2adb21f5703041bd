"""FP8 against BF16 in training (issue 19, "Training (CPU, tiny profile)"): the same pretraining run, from the same
initialisation and data, with `train.precision=bf16` and with `fp8` (V3's blockwise FP8 GEMMs, here the CPU
emulation: training/model/fp8_linear.py), and with `fp32` for scale: how far any change of precision moves a run
this small and short. It prints each final loss (the mean of the last 10% of steps) and the relative gaps;
DeepSeek-V3 §3.3 reports under 0.25% between its FP8 and BF16 runs (at far larger scale and length). Every logged
loss is in each run's MLflow store (`mlflow.db`); nothing is tuned here.

    .venv/bin/python benchmarks/fp8.py [--steps 200] [--seeds 1 2 3] [--out DIR] [--corpus DIR]

--seeds: one set of three runs per seed (initialisation and data order); the gaps are printed per seed and as a
mean, so a gap can be told from the spread of the seeds.

--corpus: an earlier curate run's root to train on (default: curated here, once, under --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_runs import stage  # noqa: E402

V3_GAP = 0.0025   # DeepSeek-V3 §3.3: the FP8 model's relative loss error stays below 0.25%


def losses(root: Path, metric: str = "lm_loss") -> dict[int, float]:
    """The pretrain run's logged `metric` (its loss) per step, from its MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("seekflow")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}


def final(curve: dict[int, float]) -> float:
    """The mean loss of the last 10% of the logged steps."""
    steps = sorted(curve)
    tail = steps[-max(1, len(steps) // 10):]
    return sum(curve[s] for s in tail) / len(tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-fp8")
    parser.add_argument("--corpus", type=Path, help="an earlier curate run's root (its curate/ is read)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    out = args.out.resolve()
    corpus = args.corpus.resolve() if args.corpus else out / "corpus"
    if not (corpus / "curate" / "manifest.json").is_file():
        stage("curate", corpus, f"tracking.uri=sqlite:///{corpus}/mlflow.db")
    gaps, floors = [], []
    for seed in args.seeds:
        results = {}
        for precision in ("fp32", "bf16", "fp8"):
            root = out / f"seed{seed}" / precision
            seconds = stage("pretrain", root, f"tracking.uri=sqlite:///{root}/mlflow.db",
                            f"data_manifest={corpus / 'curate'}", f"train.precision={precision}",
                            f"train.steps={args.steps}", "train.log_interval=1",
                            f"train.save_interval={args.steps}", f"seed={seed}")
            results[precision] = (final(losses(root)), seconds)
            print(f"seed {seed}, {precision}: final loss {results[precision][0]:.5f} (mean of the last 10% of "
                  f"{args.steps} steps), {seconds:.0f} s", flush=True)
        shadow = losses(out / f"seed{seed}" / "fp8", "fp8/shadow_loss_gap")
        print(f"seed {seed}, fp8's shadow monitor (same weights, FP8 vs BF16 GEMMs): "
              + ", ".join(f"step {step} {100 * gap:+.3f}%" for step, gap in sorted(shadow.items())), flush=True)
        gaps.append((results["fp8"][0] - results["bf16"][0]) / results["bf16"][0])
        floors.append((results["bf16"][0] - results["fp32"][0]) / results["fp32"][0])
        print(f"seed {seed}: relative gap fp8 vs bf16 {100 * gaps[-1]:+.3f}%; bf16 vs fp32, for scale: "
              f"{100 * floors[-1]:+.3f}%", flush=True)
    gap, floor = sum(gaps) / len(gaps), sum(floors) / len(floors)
    verdict = "within" if abs(gap) < V3_GAP else "NOT within"
    print(f"mean over seeds {args.seeds}: fp8 vs bf16 {100 * gap:+.3f}% ({verdict} V3's 0.25%; per seed "
          f"{', '.join(f'{100 * g:+.3f}%' for g in gaps)}); bf16 vs fp32 {100 * floor:+.3f}% (per seed "
          f"{', '.join(f'{100 * f:+.3f}%' for f in floors)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
