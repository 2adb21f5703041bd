#!/usr/bin/env python3
"""Run the seekflow platform on this machine: MLflow + Airflow, then the pipeline DAG.

    local_platform.py run [--profile tiny] [--steps N] [--timeout-min 30] [--verbose]
    local_platform.py stop
    local_platform.py status

`run` starts (or reuses) an MLflow tracking server and `airflow standalone`, both as their own process
groups, triggers the `seekflow_pipeline` DAG through Airflow's REST API, follows it in the terminal and
prints a summary. Servers stay up afterwards; `stop` ends exactly the process groups in the pid files.

State lives in <repo>/.seekflow/: mlflow/ (sqlite db + artifacts), airflow/ (AIRFLOW_HOME), logs/, pids/.
Ports: SEEKFLOW_MLFLOW_PORT (5000), SEEKFLOW_AIRFLOW_PORT (8080). DAGs: SEEKFLOW_DAGS_FOLDER (<repo>/dags).
Standard library only, so `stop` and `status` work without the virtualenv.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # for operators.backends.local: stdlib only, so `stop` still needs no virtualenv
from operators.backends.local import group_alive  # noqa: E402  (one /proc scan for live process-group members)
STATE = ROOT / ".seekflow"
VENV_BIN = ROOT / ".venv" / "bin"
DAG_ID = "seekflow_pipeline"
MLFLOW_PORT = int(os.environ.get("SEEKFLOW_MLFLOW_PORT", "5000"))
AIRFLOW_PORT = int(os.environ.get("SEEKFLOW_AIRFLOW_PORT", "8080"))
MLFLOW_URL = f"http://127.0.0.1:{MLFLOW_PORT}"
AIRFLOW_URL = f"http://127.0.0.1:{AIRFLOW_PORT}"
AIRFLOW_HOME = STATE / "airflow"
PASSWORD_FILE = AIRFLOW_HOME / "simple_auth_manager_passwords.json.generated"
# Task log lines worth echoing while following a run (everything is shown with --verbose).
PROGRESS = re.compile(r"step|loss|\bETA\b|error|doc(ument)?s\b|tokens|checkpoint|registered|alias|created", re.IGNORECASE)
# "key: value" lines of a config dump: indented, or top-level with a one-word value ("alias: candidate").
CONFIG_LINE = re.compile(r"\s+[\w.-]+: |[\w.-]+: \S*$")
TERMINAL = {"success", "failed", "skipped", "upstream_failed", "removed"}


def say(msg=""):
    print(msg, flush=True)


def http(method, url, body=None, token=None, timeout=10):
    """JSON request -> (status, parsed body); status 0 when the server cannot be reached."""
    req = urllib.request.Request(url, method=method, headers={"Accept": "application/json"})
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


# ---------------------------------------------------------------- servers and pid files

def mlflow_healthy():
    return http("GET", f"{MLFLOW_URL}/health", timeout=3)[0] == 200


def airflow_healthy():
    status, body = http("GET", f"{AIRFLOW_URL}/api/v2/monitor/health", timeout=3)
    if status != 200 or not isinstance(body, dict):
        return False
    parts = [body.get(k) or {} for k in ("metadatabase", "scheduler", "dag_processor")]
    return all(p.get("status") in (None, "healthy") for p in parts) and body.get("scheduler")


def mlflow_spec():
    db, artifacts = STATE / "mlflow" / "mlflow.db", STATE / "mlflow" / "artifacts"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
           "--workers", "1"]
    # The job runner (huey consumers, GenAI scorers) adds ~7 processes and ~1.7 GB; training needs none of it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return dict(name="mlflow", port=MLFLOW_PORT, port_var="SEEKFLOW_MLFLOW_PORT", url=MLFLOW_URL,
                healthy=mlflow_healthy, cmd=cmd, env=env, wait_s=180)


def airflow_spec():
    env = {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": os.environ.get("SEEKFLOW_DAGS_FOLDER", str(ROOT / "dags")),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(AIRFLOW_PORT),
        # Tasks reach the Execution API through base_url; its default assumes port 8080.
        "AIRFLOW__API__BASE_URL": AIRFLOW_URL,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",  # Airflow 3 name of dag_dir_list_interval
        # Local tasks share the cores with training processes. The 5 s default let a 39 s api-server stall (CI,
        # 2 cores) time out all five start attempts, which failed the task while it was still queued.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": MLFLOW_URL,
        "SEEKFLOW_HOME": str(STATE),
        "PYTHONPATH": str(ROOT),
    }
    return dict(name="airflow", port=AIRFLOW_PORT, port_var="SEEKFLOW_AIRFLOW_PORT", url=AIRFLOW_URL,
                healthy=airflow_healthy, cmd=[str(VENV_BIN / "airflow"), "standalone"], env=env, wait_s=300)


def pid_file(name):
    return STATE / "pids" / f"{name}.pid"


def our_pgid(name):
    """Process-group id from the pid file if that group still runs, else None.

    A pid is not reused while its group has members; if the leader lives, its command line must
    name the server, which guards against a recycled pid."""
    try:
        pgid = int(pid_file(name).read_text().split()[0])
    except (OSError, ValueError):
        return None
    if not group_alive(pgid):
        return None
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return pgid  # leader gone, members left: still our group
    return pgid if not cmdline or name in cmdline else None


def port_busy(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tail(path, n=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def start_server(spec):
    """Start the server unless our own copy already runs; refuse a port held by anything else."""
    name, log = spec["name"], STATE / "logs" / f"{spec['name']}.log"
    pgid = our_pgid(name)
    if pgid:
        old_port = pid_file(name).read_text().split()[1:2]
        if old_port and int(old_port[0]) != spec["port"]:
            sys.exit(f"error: our {name} already runs on port {old_port[0]}, not {spec['port']}; `make stop` first")
        say(f"{name}: already running (pgid {pgid}), reusing it")
        return
    pid_file(name).unlink(missing_ok=True)
    if port_busy(spec["port"]):
        sys.exit(f"error: port {spec['port']} for {name} is taken by another process; set {spec['port_var']} "
                 f"to a free port, e.g. `{spec['port_var']}={spec['port'] + 1} make run`")
    if not Path(spec["cmd"][0]).exists():
        sys.exit(f"error: {spec['cmd'][0]} not found; run `make venv` first")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **spec["env"]}
    with open(log, "ab") as out:
        proc = subprocess.Popen(spec["cmd"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file(name).write_text(f"{proc.pid} {spec['port']}\n")  # new session: pid == pgid
    say(f"{name}: starting (pgid {proc.pid}, log {log.relative_to(ROOT)})")


def wait_healthy(spec, since):
    name, log = spec["name"], STATE / "logs" / f"{spec['name']}.log"
    dots = ""
    while not spec["healthy"]():
        if time.time() - since > spec["wait_s"] or not our_pgid(name):
            say(f"\n{name} did not become healthy at {spec['url']}; last lines of {log}:\n{tail(log)}")
            sys.exit(1)
        dots = "\n"
        print(".", end="", flush=True)
        time.sleep(2)
    say(f"{dots}{name} healthy after {time.time() - since:.0f}s: {spec['url']}")


def airflow_password():
    try:
        return json.loads(PASSWORD_FILE.read_text()).get("admin")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- Airflow REST helpers

class Airflow:
    def __init__(self):
        deadline = time.time() + 60
        while True:
            status, body = http("POST", f"{AIRFLOW_URL}/auth/token",
                                {"username": "admin", "password": airflow_password() or ""})
            if status in (200, 201) and isinstance(body, dict) and body.get("access_token"):
                self.token = body["access_token"]
                return
            if time.time() > deadline:
                sys.exit(f"error: cannot log in to Airflow as admin ({status}: {body}); password file {PASSWORD_FILE}")
            time.sleep(2)

    def __call__(self, method, path, body=None):
        return http(method, f"{AIRFLOW_URL}/api/v2{path}", body, token=self.token, timeout=30)

    def run_path(self, run_id):
        return f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def log_entries(self, run_id, task_id, try_number):
        """Task log as [(key, lines)]; the key identifies an entry across polls.

        Airflow 3 answers {"content": [{"timestamp", "event", "level", "logger", ...}], "continuation_token"};
        entries without a timestamp are the "Log message source details" header. Plain text is handled too.
        """
        status, body = self("GET", f"{self.run_path(run_id)}/taskInstances/{task_id}/logs/{try_number}"
                                   "?full_content=true")
        if status != 200:
            return []
        content = body.get("content", body) if isinstance(body, dict) else body
        if isinstance(content, str):
            content = content.splitlines()
        entries = []
        for i, entry in enumerate(content or []):
            if isinstance(entry, dict):
                if "timestamp" not in entry:
                    continue
                text = entry.get("event") if isinstance(entry.get("event"), str) else json.dumps(entry)
                for exc in entry.get("error_detail") or []:  # exceptions come structured, not as text
                    frames = exc.get("frames") or []
                    text += "".join(f"\n  File {f.get('filename')}, line {f.get('lineno')}, in {f.get('name')}"
                                    for f in frames)
                    text += f"\n{exc.get('exc_type')}: {exc.get('exc_value')}"
                key = (entry["timestamp"], text)
            else:
                text = str(entry[-1]) if isinstance(entry, (list, tuple)) and entry else str(entry)
                key = (i, text)
            lines = [line for line in text.splitlines() if not line.startswith("::")]
            if lines:
                entries.append((key, lines))
        return entries

    def xcom(self, run_id, task_id):
        status, body = self("GET", f"{self.run_path(run_id)}/taskInstances/{task_id}/xcomEntries/return_value")
        value = body.get("value") if status == 200 and isinstance(body, dict) else None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        return value if isinstance(value, dict) else None


def wait_for_dag(api):
    deadline = time.time() + 60
    while True:
        status, dag = api("GET", f"/dags/{DAG_ID}")
        if status == 200 and not dag.get("is_stale"):  # a DAG that left the dags folder stays in the DB as stale
            return
        if time.time() > deadline:
            _, body = api("GET", "/importErrors")
            errors = (body or {}).get("import_errors", []) if isinstance(body, dict) else []
            say(f"error: DAG {DAG_ID} not found after 60s; {len(errors)} import error(s)")
            for err in errors:
                say(f"--- {err.get('filename')}\n{err.get('stack_trace')}")
            sys.exit(1)
        time.sleep(2)


def follow(api, run_id, timeout_s, verbose):
    """Print task state changes and task log lines until the run ends; return (run state, tasks)."""
    start, states, seen, misses = time.time(), {}, {}, 0
    while True:
        status, run = api("GET", api.run_path(run_id))
        misses = misses + 1 if status == 0 else 0
        if misses >= 10:
            say("error: Airflow stopped answering (was it stopped?); see .seekflow/logs/airflow.log")
            return "unreachable", []
        _, body = api("GET", f"{api.run_path(run_id)}/taskInstances")
        tasks = (body or {}).get("task_instances", []) if isinstance(body, dict) else []
        for ti in sorted(tasks, key=lambda t: t.get("start_date") or "~"):
            key, state = ti["task_id"], ti.get("state") or "none"
            changed = states.get(key) != state
            if changed:
                states[key] = state
                if state != "none":
                    say(f"[{time.time() - start:6.0f}s] {key}: {state}")
            if state == "running" or (changed and state in TERMINAL | {"up_for_retry"}):
                shown = seen.setdefault((key, ti.get("try_number") or 1), set())
                for entry_key, lines in api.log_entries(run_id, key, ti.get("try_number") or 1):
                    if entry_key not in shown:
                        shown.add(entry_key)
                        for line in lines:
                            if verbose or (PROGRESS.search(line) and not CONFIG_LINE.match(line)):
                                say(f"    {key} | {line}")
        run_state = run.get("state") if status == 200 and isinstance(run, dict) else None
        if run_state in ("success", "failed"):
            return run_state, tasks
        if time.time() - start > timeout_s:
            say(f"timeout: run still {run_state} after {timeout_s / 60:.0f} min (it keeps running in Airflow)")
            return "timeout", tasks
        time.sleep(3)


def loss_trend(mlflow_run_id):
    """' (first 10% of logged steps 11.6 -> last 10% 8.0, -31%)' from the pretrain run's MLflow history."""
    if not mlflow_run_id:
        return ""
    query = urllib.parse.urlencode({"run_id": mlflow_run_id, "metric_key": "lm_loss", "max_results": 10000})
    status, body = http("GET", f"{MLFLOW_URL}/api/2.0/mlflow/metrics/get-history?{query}")
    points = sorted((m["step"], m["value"]) for m in (body or {}).get("metrics", [])) if status == 200 else []
    if len(points) < 2:
        return ""
    n = max(1, len(points) // 10)
    first, last = (sum(v for _, v in part) / n for part in (points[:n], points[-n:]))
    return f"  (MLflow lm_loss: first 10% of steps {first:.2f} -> last 10% {last:.2f}, {last / first - 1:+.0%})"



# The training stages of the pipeline chain and the suffix of the evaluate/register/promote instances that gate them
# (training/config/pipeline.py PIPELINE_CHAIN).
def segment_summary(api, run_id, trained, suffix):
    """One training stage's lines: its final loss, its scores, the version it became (and its parent), the decision."""
    result = api.xcom(run_id, trained) or {}
    if not result:
        return
    say(f"--- {trained}")
    if "final_loss" in result:
        say(f"final loss:       {result['final_loss']:.4f}{loss_trend(result.get('mlflow_run_id'))}")
    reg = api.xcom(run_id, f"register{suffix}") or {}
    if reg.get("model_name"):
        query = urllib.parse.urlencode({"name": reg["model_name"], "version": reg.get("version", "")})
        status, body = http("GET", f"{MLFLOW_URL}/api/2.0/mlflow/model-versions/get?{query}")
        mv = (body or {}).get("model_version", {}) if isinstance(body, dict) else {}
        tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
        aliases = ", ".join(f"@{a}" for a in mv.get("aliases", [])) or "no alias now"
        confirmed = f"in MLflow: {aliases}" if status == 200 and mv else f"NOT found in MLflow (HTTP {status})"
        say(f"registered model: {reg['model_name']} v{reg.get('version')} ({confirmed}), "
            f"parent version: {tags.get('seekflow.parent_version', '?')}")
        say(f"  {MLFLOW_URL}/#/models/{urllib.parse.quote(reg['model_name'])}/versions/{reg.get('version')}")
    evaluation = api.xcom(run_id, f"evaluate{suffix}") or {}
    scores = {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scores:
        say("evaluation:       " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))
    promotion = api.xcom(run_id, f"promote{suffix}") or {}
    if promotion.get("decision"):
        say(f"promotion:        {promotion.get('model_name')} v{promotion.get('version')} -> "
            f"{promotion['decision'].upper()} (alias @{promotion.get('alias')}): {promotion.get('reason', '')}")
        for metric, row in sorted((promotion.get("compared") or {}).items()):
            champion = row.get("champion")
            against = f"champion {champion:.4g}" if isinstance(champion, (int, float)) else "no champion yet"
            say(f"  {metric:<28} candidate {row.get('candidate', float('nan')):.4g} vs {against} "
                f"(max regression {row.get('max_regression')}) {'ok' if row.get('ok') else 'NOT OK'}")

def summary(api, run_id, run_state, tasks, elapsed):
    bar = "=" * 72
    say(f"\n{bar}\nseekflow pipeline run {run_id}: {run_state.upper()} in {elapsed:.0f}s")
    for ti in sorted(tasks, key=lambda t: t.get("start_date") or "~"):
        dur = ti.get("duration")
        say(f"  {ti['task_id']:<24} {ti.get('state') or 'none':<16} {f'{dur:.1f}s' if dur else ''}")
    for trained, suffix in (("pretrain", ""), ("code_cpt", "_code_cpt"), ("long_context", "_long_context"),
                            ("sft", "_sft")):
        segment_summary(api, run_id, trained, suffix)
    say(f"Airflow UI:       {AIRFLOW_URL}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}")
    say(f"MLflow UI:        {MLFLOW_URL}")
    say(f"Airflow login:    admin / {airflow_password()}")
    say("Servers keep running: `make stop` stops them.")
    say(bar)
    failed = [ti for ti in tasks if ti.get("state") in ("failed", "up_for_retry")]
    for ti in failed:
        entries = api.log_entries(run_id, ti["task_id"], ti.get("try_number") or 1)
        lines = [line for _, entry_lines in entries for line in entry_lines]
        say(f"\n--- {ti['task_id']} failed; last log lines:\n" + "\n".join(lines[-40:]))


# ---------------------------------------------------------------- commands

def check_sandbox() -> None:
    """The evaluate stage runs model-written code in bubblewrap: say so now, not after pretraining."""
    sys.path.insert(0, str(ROOT))
    from training.verify.isolation import SandboxUnavailable, preflight

    try:
        preflight("namespaces")
    except SandboxUnavailable as exc:
        sys.exit(f"seekflow: {exc}")


def cmd_run(args):
    check_sandbox()
    for sub in ("mlflow/artifacts", "airflow", "logs", "pids"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    specs = [mlflow_spec(), airflow_spec()]
    for spec in specs:  # both start at once; tasks need MLflow only once they run
        start_server(spec)
    for spec in specs:
        wait_healthy(spec, t0)
    api = Airflow()
    wait_for_dag(api)
    api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    conf = {"profile": args.profile, **({"steps": args.steps} if args.steps is not None else {})}
    status, body = api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    if status not in (200, 201) or not isinstance(body, dict):
        detail = body.get("detail", body) if isinstance(body, dict) else body
        sys.exit(f"error: trigger rejected (HTTP {status}): {detail}")
    run_id = body["dag_run_id"]
    say(f"triggered {DAG_ID} run {run_id} with conf {json.dumps(conf)}")
    run_state, tasks = follow(api, run_id, args.timeout_min * 60, args.verbose)
    if run_state == "unreachable":
        return 1
    summary(api, run_id, run_state, tasks, time.time() - t0)
    return 0 if run_state == "success" else 1


def cmd_stop(_args):
    stopped = False
    for name in ("airflow", "mlflow"):
        pgid = our_pgid(name)
        if pgid:
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.time() + 15
            while time.time() < deadline and group_alive(pgid):
                time.sleep(0.5)
            if group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
                say(f"{name}: killed process group {pgid} (still running 15s after SIGTERM)")
            else:
                say(f"{name}: stopped process group {pgid}")
            stopped = True
        pid_file(name).unlink(missing_ok=True)
    if not stopped:
        say("nothing to stop")
    return 0


def cmd_status(_args):
    for spec in (mlflow_spec(), airflow_spec()):
        pgid, healthy = our_pgid(spec["name"]), spec["healthy"]()
        state = "up" if healthy else "starting/unhealthy" if pgid else "down"
        owner = f" (pgid {pgid})" if pgid else " (not started by seekflow)" if healthy else ""
        say(f"{spec['name']:<8} {state}{owner}  {spec['url']}")
    if our_pgid("airflow") and airflow_password():
        say(f"airflow login: admin / {airflow_password()}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start servers (or reuse them), trigger the pipeline, follow it")
    run.add_argument("--profile", default="tiny")
    run.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    run.add_argument("--timeout-min", type=float, default=30)
    run.add_argument("--verbose", action="store_true", help="echo every task log line, not just progress")
    sub.add_parser("stop", help="stop the servers started by `run`")
    sub.add_parser("status", help="show whether the servers are up")
    args = parser.parse_args(argv)
    try:
        return {"run": cmd_run, "stop": cmd_stop, "status": cmd_status}[args.command](args)
    except KeyboardInterrupt:
        say("\ninterrupted: a triggered run keeps going in Airflow; servers stay up (`make stop`)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
