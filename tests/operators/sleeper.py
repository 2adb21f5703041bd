"""A stand-in training entry point for backend tests: `python -m sleeper <mode> --config PATH`.

modes: `sleep` prints "ready <pid>" and sleeps (with a child process of its own); `fail` prints and exits 3;
`bad_input` reports bad input (SEEKFLOW_FAILURE) and exits 3; `ok` prints a SEEKFLOW_RESULT line; `shard` reports its shard index (and fails as shard 2); `malformed` prints a broken
result line, bytes that are not UTF-8 and more output than a pipe holds, then exits 0 (`malformed_then_ok`: and then a
good result line); `environ` reports the environment the kernel gave it (/proc/self/environ).
"""
import json
import os
import subprocess
import sys
import time

mode = sys.argv[1]
print(f"rank {os.environ.get('RANK', '0')} started, config {sys.argv[3]}", flush=True)
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"ready {os.getpid()} child {child.pid}", flush=True)
    time.sleep(600)
elif mode == "shard":   # fails on shard 2 of a sharded run
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if index == "2":
        print("shard 2 is broken", flush=True)
        sys.exit(4)
    print("SEEKFLOW_RESULT " + json.dumps({"shard": index, "of": os.environ.get("SEEKFLOW_NUM_SHARDS")}), flush=True)
elif mode.startswith("malformed"):
    print('SEEKFLOW_RESULT {"final_loss": 1.5, "checkpoint": ', flush=True)
    print("SEEKFLOW_RESULT [1, 2]", flush=True)   # JSON, but not an object
    sys.stdout.buffer.write(b"not utf-8: \xff\xfe\n")
    for i in range(4000):   # ~300 KB: far more than a pipe buffers, so a dead reader would block this process
        print(f"line {i} " + "x" * 64)
    if mode == "malformed_then_ok":
        print("SEEKFLOW_RESULT " + json.dumps({"final_loss": 1.25}))
    sys.stdout.flush()
elif mode == "environ":
    with open("/proc/self/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    print("SEEKFLOW_RESULT " + json.dumps({k.decode(): v.decode(errors="replace") for k, v in pairs}), flush=True)
elif mode == "fail":
    print("something went wrong: boom", flush=True)
    sys.exit(3)
elif mode == "bad_input":   # what training/__main__.py prints for an error marked permanent
    print('SEEKFLOW_FAILURE {"stage": "bad_input", "error": "RegistryError: no registered model"}', flush=True)
    sys.exit(3)
elif os.environ.get("RANK", "0") == "0":   # as training/__main__.py: rank 0 reports, in one write
    sys.stdout.write("SEEKFLOW_RESULT " + json.dumps({"final_loss": 1.5, "config_seen": open(sys.argv[3]).read(),
                                                      "niceness": os.nice(0)}) + "\n")
    sys.stdout.flush()
