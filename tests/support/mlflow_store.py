"""MLflow sqlite stores for test runs, copied from one already migrated.

A run that logs to a fresh `sqlite:///{run_root}/mlflow.db` first builds MLflow's schema through its alembic
migrations (~1.5 s on 2 cores), and the suite starts dozens of such runs. The first run of a test process builds a
template store once; every run root then starts from a copy of it, exactly what a fresh store holds.
"""
from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_TEMPLATE: Path | None = None


def _template() -> Path:
    global _TEMPLATE
    if _TEMPLATE is None:
        folder = Path(tempfile.mkdtemp(prefix="seekflow-mlflow-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        store = folder / "mlflow.db"
        migrate = "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
        subprocess.run([sys.executable, "-c", migrate, f"sqlite:///{store}"], check=True, capture_output=True,
                       timeout=300)
        _TEMPLATE = store
    return _TEMPLATE


def sqlite_store(run_root) -> str:
    """The tracking URI `sqlite:///{run_root}/mlflow.db`, the store seeded from the migrated template unless it is
    there already (a resumed run keeps logging to its own)."""
    target = Path(run_root) / "mlflow.db"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), target)
    return f"sqlite:///{target}"
