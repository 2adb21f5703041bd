"""Score completions through the real HumanEval path and the real sandbox, in a fresh interpreter, then report.

Run by tests/security with secrets planted in this process's real environment (its exec environment, so they are in
/proc/<pid>/environ, where a sandbox escape would find them). This process makes itself a child subreaper first:
whatever a program started that outlived the sandbox would be re-parented here, so `survivors` lists it.

    python -m tests.support.hostile_eval SPEC.json OUT.json
SPEC: {"completions": [...], "limits": {...}, "via": "local" | "service", "mlflow_uri": "http://..."}
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil


def _start_service() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "training.verify.service", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()             # "sandbox: serving on 127.0.0.1:PORT (...)"
    port = line.split("serving on ")[1].split()[0].rsplit(":", 1)[1]
    return proc, f"http://127.0.0.1:{port}"


def _survivors() -> list[str]:
    """Our descendants still alive. A dead one re-parented to us (bwrap's init, killed with bwrap) is a zombie
    until we reap it: reap those, they ran nothing."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)
                continue
            alive.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except (psutil.NoSuchProcess, ChildProcessError):
            continue
    return alive


def main(spec_path: str, out_path: str) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    spec = json.loads(Path(spec_path).read_text())
    from training.benchmarks_data import load_humaneval_problems
    from training.eval import humaneval
    from training.verify.sandbox import Limits

    problem = load_humaneval_problems()[0]
    service, url = _start_service() if spec["via"] == "service" else (None, None)
    try:
        results = humaneval.execute([problem], [spec["completions"]], Limits(**spec["limits"]), workers=2,
                                    **({"sandbox_url": url} if url else {}))
    finally:
        if service is not None:
            service.kill()
            service.wait()
    metrics = humaneval.score(results, [1])
    records = [r.record() for r in results]
    print(f"hostile_eval: {metrics}", file=sys.stderr)
    for r in records:   # what the evaluate stage's log shows for each sample
        print(f"hostile_eval: {r['sample']}: {r['status']}: {r['reason']}", file=sys.stderr)

    import mlflow

    mlflow.set_tracking_uri(spec["mlflow_uri"])
    mlflow.set_experiment("security")
    with mlflow.start_run(run_name=f"hostile-{spec['via']}") as run:
        mlflow.log_metrics({f"humaneval/{k}": v for k, v in metrics.items()})
        mlflow.log_dict({"records": records}, "humaneval/records.json")
        mlflow.set_tag("reasons", " | ".join(r["reason"] for r in records)[:5000])
    survivors = _survivors()
    Path(out_path).write_text(json.dumps({"records": records, "metrics": metrics, "run_id": run.info.run_id,
                                          "survivors": survivors}))


if __name__ == "__main__":
    main(*sys.argv[1:])
