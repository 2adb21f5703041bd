"""Does the distill stage carry a teacher's task accuracy into a dense student? (issue 17, "Distillation: the dense
student reaches at least 80% of the teacher's held-out accuracy. Report the rejection rate of the sampled traces.")

Per seed, through the real stages (`python -m training ... --preset tiny`):
  distill   the tiny preset's distill stage from TEACHER (a release directory): samples_per_prompt completions per
            train prompt at temperature 0.6 / top-p 0.95, the correct ones kept, then the dense student (tiny
            without experts or MTP, random init) fine-tuned on them
  evaluate  the task suite's held-out split (greedy replies, exact checkers; every other suite off), for the teacher
            (once: greedy decoding does not depend on the seed) and for each seed's student
Printed per seed: teacher and student held-out accuracy, their ratio, the traces' rejection rate and counts, the
distill stage's wall time (sampling and training apart); then the verdict (ratio >= 0.8 on every seed). Every
number is printed; nothing is tuned here.

    .venv/bin/python benchmarks/distill.py TEACHER [--seeds 1 2 3] [--tasks sort] [--out DIR] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_runs import stage  # noqa: E402

CLAIM = 0.8   # the bar: the student reaches 80% of the teacher's held-out accuracy
TASKS_ONLY = [f"{suite}.enabled=false" for suite in ("humaneval", "fim", "passkey", "arith", "perplexity")]


def held_out_accuracy(root: Path, name: str, release: Path, tasks: list[str], items: int) -> float:
    """The evaluate stage's task-suite accuracy for `release`, scored as instance `name` under `root`."""
    stage("evaluate", root, f"tracking.uri=sqlite:///{root}/mlflow.db", f"name={name}", f"checkpoint={release}",
          *TASKS_ONLY, "tasks.enabled=true", f"tasks.tasks=[{','.join(tasks)}]", f"tasks.heldout_items={items}")
    return json.loads((root / name / "results.json").read_text())["metrics"]["tasks.accuracy"]


def run_seed(seed: int, teacher: Path, out: Path, tasks: list[str], items: int, sets: list[str]) -> dict:
    root = out / f"seed{seed}"
    seconds = stage("distill", root, f"tracking.uri=sqlite:///{root}/mlflow.db", f"seed={seed}",
                    f"teacher={teacher}", f"tasks.tasks=[{','.join(tasks)}]", *sets)
    manifest = json.loads((root / "distill" / "manifest.json").read_text())
    traces = manifest["outputs"]["data"]["traces"]
    student = held_out_accuracy(root, "evaluate_student", root / "distill" / "release", tasks, items)
    return {"seed": seed, "student": student, "traces": traces, "seconds": seconds,
            "sampling_seconds": traces["seconds"], "steps": manifest["metrics"]["steps"],
            "final_loss": manifest["metrics"]["final_loss"]}


def report(result: dict, teacher: float) -> None:
    t = result["traces"]
    ratio = result["student"] / teacher if teacher else float("nan")
    print(f"\nseed {result['seed']}: held-out accuracy teacher {teacher:.1%}, student {result['student']:.1%}, "
          f"ratio {ratio:.2f}")
    print(f"  traces: {t['sampled']} sampled over {t['prompts']} prompts, {t['correct']} correct, kept {t['kept']} "
          f"({t['duplicates']} duplicates; {t['wrong']} wrong, {t['unfinished']} unfinished): rejection rate "
          f"{t['rejection_rate']:.1%}")
    print(f"  distill wall time {result['seconds']:.0f} s (sampling {result['sampling_seconds']:.0f} s, then "
          f"{result['steps']} student steps to loss {result['final_loss']:.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="the teacher's release directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tasks", nargs="+", default=["sort"], help="task suite tasks to distil and score")
    parser.add_argument("--heldout-items", type=int, default=100, help="held-out items per task")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-distill")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="key=value",
                        help="a distill override, e.g. tasks.train_items=500 (repeatable)")
    args = parser.parse_args()
    out, teacher = args.out.resolve(), args.teacher.resolve()
    teacher_accuracy = held_out_accuracy(out, "evaluate_teacher", teacher, args.tasks, args.heldout_items)
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, teacher, out, args.tasks, args.heldout_items, args.sets))
        report(results[-1], teacher_accuracy)
    (out / "results.json").write_text(json.dumps({"teacher": str(teacher), "teacher_accuracy": teacher_accuracy,
                                                  "settings": args.sets, "seeds": results}, indent=2))
    reached = [r["seed"] for r in results if r["student"] >= CLAIM * teacher_accuracy]
    print(f"\nstudent at >= {CLAIM:.0%} of the teacher's {teacher_accuracy:.1%}: seeds {reached or 'none'} of "
          f"{args.seeds}; results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
