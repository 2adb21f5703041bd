"""What a job is, independent of where it runs: the seam between Airflow and the compute backends."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

RESULT_PREFIX = "SEEKFLOW_RESULT "   # the last line `python -m training` prints: the stage's result as JSON


@dataclass(frozen=True)
class JobSpec:
    """One stage run. `config_yaml` is the validated stage config, exactly what `python -m training` reads."""

    stage: str
    config_yaml: str
    launcher: Literal["torchrun", "python"] = "python"
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)   # who the job belongs to: dag, task, run, try
    shards: int = 1              # CPU data stages: parallel shards (a Kubernetes Indexed Job's completions)
    sharded: bool = False        # run as `shards` shard processes, each told its index (the stage's shard phase)
    module: str = "training"     # the entry module; tests point it elsewhere

    def training_args(self, config_path: str) -> list[str]:
        return ["-m", self.module, self.stage, "--config", config_path]


class JobFailed(RuntimeError):
    """The job ran and failed; the message carries its exit status and last output lines. `permanent`: the job said
    its input is bad (a `SEEKFLOW_FAILURE` line), so running it again cannot succeed and the task is not retried."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


FAILURE_PREFIX = "SEEKFLOW_FAILURE "   # what a job prints before exiting on bad input (training/__main__.py)


class Backend(Protocol):
    def run(self, spec: JobSpec, log: Callable[[str], None]) -> dict:
        """Run the job to completion, streaming its output to `log`; return the stage's result dict."""

    def kill(self) -> None:
        """Stop everything this backend started for the running job."""


class MalformedResult(ValueError):
    """A `SEEKFLOW_RESULT` line whose payload is not a JSON object (a torn write, interleaved ranks, a stray print)."""


def read_result(line: str) -> dict | None:
    """The result a `SEEKFLOW_RESULT` line carries; None for any other line; MalformedResult for a broken one."""
    if not line.startswith(RESULT_PREFIX):
        return None
    try:
        result = json.loads(line[len(RESULT_PREFIX):])
    except (ValueError, RecursionError) as exc:   # RecursionError: deeply nested brackets
        raise MalformedResult(f"malformed {RESULT_PREFIX.strip()} line ({exc}): {line[:200]!r}") from None
    if not isinstance(result, dict):
        raise MalformedResult(f"{RESULT_PREFIX.strip()} is not a JSON object: {line[:200]!r}")
    return result


def parse_result(line: str) -> dict | None:
    """Like read_result, but a malformed line is no result (None): the line is in the task log for whoever looks."""
    try:
        return read_result(line)
    except MalformedResult:
        return None
