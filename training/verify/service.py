"""The sandbox service: runs programs for training jobs that must not run them themselves.

On Kubernetes a training job holds S3 and MLflow credentials, so model-written code never runs in it. The evaluate and
RL stages POST their programs to this service (k8s/platform/sandbox.yaml: a pod with no secrets, no service-account
token and no network but the jobs' requests) and get the outcomes back, in order:

    POST /run   {"programs": ["...", ...], "limits": {"wall_s": 10, ...}}  ->  {"outcomes": [{status, reason, ...}]}
    GET  /healthz

A request may ask for tighter limits than the service's, never looser ones: each limit is the smaller of the two.

    python -m training.verify.service --host 0.0.0.0 --port 8080 --isolation pod
"""
from __future__ import annotations

import argparse
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from training.verify import isolation as iso
from training.verify import reaper
from training.verify.sandbox import run_python
from training.verify.spec import Limits, Outcome

MAX_BODY_BYTES = 32 << 20
MAX_PROGRAMS = 4096


def clamp(requested: dict, ceiling: Limits) -> Limits:
    """The request's limits, none looser than the service's."""
    unknown = set(requested) - {f.name for f in fields(Limits)}
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}")
    values = asdict(ceiling)
    for name, value in requested.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"limit {name!r} must be a positive number, not {value!r}")
        values[name] = type(values[name])(min(value, values[name]))
    return Limits(**values)


class SandboxService(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, isolation: str, ceiling: Limits, workers: int):
        super().__init__(address, _Handler)
        self.isolation, self.ceiling = isolation, ceiling
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self.served = 0

    def run(self, programs: list[str], limits: Limits) -> list[Outcome]:
        return list(self.pool.map(lambda p: run_python(p, limits, self.isolation), programs))


class _Handler(BaseHTTPRequestHandler):
    server: SandboxService

    def do_GET(self) -> None:   # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            self._reply(200, {"status": "ok", "isolation": self.server.isolation, "served": self.server.served})
        else:
            self._reply(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:   # noqa: N802
        if self.path != "/run":
            return self._reply(404, {"error": f"no such path {self.path}"})
        try:
            programs, limits = self._request()
        except ValueError as exc:
            return self._reply(400, {"error": str(exc)})
        outcomes = self.server.run(programs, limits)
        self.server.served += len(programs)
        self._reply(200, {"outcomes": [o.record() for o in outcomes]})

    def _request(self) -> tuple[list[str], Limits]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"the body must be 1 to {MAX_BODY_BYTES} bytes, not {length}")
        try:
            body = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from None
        programs = body.get("programs") if isinstance(body, dict) else None
        if not isinstance(programs, list) or not all(isinstance(p, str) for p in programs):
            raise ValueError("'programs' must be a list of strings")
        if len(programs) > MAX_PROGRAMS:
            raise ValueError(f"at most {MAX_PROGRAMS} programs per request, not {len(programs)}")
        return programs, clamp(body.get("limits") or {}, self.server.ceiling)

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args) -> None:   # one line per request, without the programs
        print(f"sandbox: {self.address_string()} {fmt % args}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.verify.service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--isolation", choices=sorted(iso.LAUNCHERS), default="namespaces")
    parser.add_argument("--workers", type=int, default=2, help="programs run at once")
    args = parser.parse_args(argv)
    if args.isolation == "pod":
        reaper.become_subreaper()   # setsid() orphans come back to us, to be killed (training.verify.reaper)
    iso.preflight(args.isolation)
    server = SandboxService((args.host, args.port), args.isolation, Limits(), args.workers)
    print(f"sandbox: serving on {args.host}:{server.server_address[1]} (isolation {args.isolation}, "
          f"{args.workers} workers)", flush=True)
    threading.current_thread().name = "sandbox-http"
    server.serve_forever()


if __name__ == "__main__":
    main()
