"""Does CAP keep more of a fine-tuned model's accuracy at 90% sparsity? (issue 20, "CAP helps") Per seed, the tiny
profile's compress stage prunes the seed's sft release to the preset's 90% unstructured sparsity (CAP's nine steps)
five ways, the same schedule, steps and data each time:

  none     the task loss alone (pruning + fine-tuning, no contrastive term)
  cap      the task loss + PrC + FiC + SnC (CAP)
  -prc     CAP without PrC        -fic   CAP without FiC        -snc   CAP without SnC

Each pruned release, and the fine-tuned model itself, is scored by the evaluate stage's task suite on the held-out
split (exact match, greedy). Printed per seed: the fine-tuned accuracy, each variant's, and the share of the
fine-tuned accuracy it keeps; then the claim's verdict (cap keeps more than none on every seed). Nothing is tuned.

The seeds' pretrain and sft releases come from benchmarks/sft_learning.py (`--bases DIR`: DIR/seed<N>/pretrain/release
and DIR/seed<N>/sft_e4/release, the four-epoch sft the tiny preset now runs), or are trained here.

    .venv/bin/python benchmarks/cap_learning.py --bases /tmp/sftb [--seeds 1 2 3] [--out DIR] [--variants ...]
        [--set compress.key=value ...] [--heldout 100]
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_runs import stage  # noqa: E402

VARIANTS = {
    "none": ["contrastive.prc_weight=0", "contrastive.fic_weight=0", "contrastive.snc_weight=0"],
    "cap": [],
    "-prc": ["contrastive.prc_weight=0"],
    "-fic": ["contrastive.fic_weight=0"],
    "-snc": ["contrastive.snc_weight=0"],
}
OTHER_SUITES = [f"{suite}.enabled=false" for suite in ("humaneval", "fim", "passkey", "arith", "perplexity")]


def tracking(root: Path) -> str:
    return f"tracking.uri=sqlite:///{root}/mlflow.db"


HELDOUT = 100   # held-out sort items scored per release (the tiny preset's evaluate_compress); --heldout changes it


def accuracy(root: Path, name: str, release: Path, seed: int) -> float:
    name = name if HELDOUT == 100 else f"{name}_h{HELDOUT}"
    if not (root / name / "results.json").exists():
        stage("evaluate", root, tracking(root), f"seed={seed}", f"name={name}", f"checkpoint={release}",
              *OTHER_SUITES, "tasks.enabled=true", "tasks.tasks=[sort]", f"tasks.heldout_items={HELDOUT}")
    return json.loads((root / name / "results.json").read_text())["metrics"]["tasks.accuracy"]


def run_variant(seed: int, variant: str, bases: Path, out: Path, sets: list[str]) -> tuple[float, float, float]:
    root, base = out / f"seed{seed}", bases / f"seed{seed}"
    name = f"compress_{variant.replace('-', 'no_')}"
    seconds = 0.0
    if not (root / name / "manifest.json").exists():
        seconds = stage("compress", root, tracking(root), f"seed={seed}", f"name={name}",
                        f"fine_tuned={base / 'sft_e4' / 'release'}", f"pretrained={base / 'pretrain' / 'release'}",
                        *sets, *VARIANTS[variant])
    manifest = json.loads((root / name / "manifest.json").read_text())
    return accuracy(root, f"evaluate_{name}", root / name / "release", seed), manifest["metrics"]["sparsity"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/cap_learning"))
    parser.add_argument("--jobs", type=int, default=2, help="compress runs at once (each one process)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="key=value",
                        help="a compress override for every variant (e.g. epochs=18), repeatable")
    parser.add_argument("--heldout", type=int, default=HELDOUT, help="held-out items scored per release")
    args = parser.parse_args()
    globals()["HELDOUT"] = args.heldout
    jobs = [(seed, variant) for seed in args.seeds for variant in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run_variant(*job, args.bases, args.out, args.sets), jobs)))
    wins = []
    for seed in args.seeds:
        root = args.out / f"seed{seed}"
        tuned = accuracy(root, "evaluate_fine_tuned", args.bases / f"seed{seed}" / "sft_e4" / "release", seed)
        print(f"seed {seed}: fine-tuned accuracy {tuned:.2f}")
        for variant in args.variants:
            acc, sparsity, seconds = results[(seed, variant)]
            kept = acc / tuned if tuned else float("nan")
            print(f"  {variant:5s} accuracy {acc:.2f} (keeps {kept:.0%} of it) at sparsity {sparsity:.4f}"
                  + (f", {seconds:.0f}s" if seconds else ""))
        if {"cap", "none"} <= set(args.variants):
            gap = results[(seed, "cap")][0] - results[(seed, "none")][0]
            wins.append(gap > 0)
            print(f"  cap - none: {gap:+.2f}")
    if wins:
        print(f"claim (CAP keeps more than pruning without its terms, every seed): {'met' if all(wins) else 'NOT met'}")


if __name__ == "__main__":
    main()
