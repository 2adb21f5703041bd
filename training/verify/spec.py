"""What a sandboxed program may use (`Limits`: each enforced by the kernel or by the reader, never by the program),
and how it ended (`Outcome`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 10            # RLIMIT_CPU
    memory_mb: int = 1024      # RLIMIT_AS
    output_kb: int = 1024      # stdout + stderr as read by the parent; also RLIMIT_FSIZE, the cap on any one file
    scratch_mb: int = 64       # the writable tmpfs (namespaces isolation)
    processes: int = 64        # RLIMIT_NPROC


@dataclass(frozen=True)
class Outcome:
    status: Status
    reason: str                # "ok", or why it failed / timed out / could not run
    seconds: float
    stderr_tail: str = ""

    def record(self) -> dict:
        return asdict(self)
