"""A stand-in training entry point for backend tests: `python -m sleeper <mode> --config PATH`.

modes: `sleep` prints "ready <pid>" and sleeps (with a child process of its own); `fail` prints and exits 3;
`ok` prints a SEEKFLOW_RESULT line; `shard` reports its shard index (and fails as shard 2).
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
elif mode == "fail":
    print("something went wrong: boom", flush=True)
    sys.exit(3)
else:
    print("SEEKFLOW_RESULT " + json.dumps({"final_loss": 1.5, "config_seen": open(sys.argv[3]).read(),
                                           "niceness": os.nice(0)}), flush=True)
