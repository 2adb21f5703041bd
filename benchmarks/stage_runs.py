"""Running seekflow's stages from a benchmark: `python -m training <kind> --preset <preset>` in a fresh process, its
output in a log file beside the run, failing loudly with the log's tail."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage(kind: str, run_root: Path, *sets: str, preset: str = "tiny") -> float:
    """The stage with `run_root` and the `--set` overrides `sets`; its wall time in seconds."""
    cmd = [sys.executable, "-W", "ignore", "-m", "training", kind, "--preset", preset, "--set", f"run_root={run_root}"]
    for item in sets:
        cmd += ["--set", item]
    run_root.mkdir(parents=True, exist_ok=True)
    log = run_root / f"{kind}-{len(list(run_root.glob('*.log')))}.log"
    started = time.time()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.time() - started
