"""Checkpoints carry every random generator a step can draw from, through megatron's dist_checkpointing (a
ShardedObject, stored as bytes in the .distcp files and read back with `torch.load(weights_only=False)`: see
training/checkpoint.py): after a load, each generator continues exactly where the save left it."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.support.processes import REPO

_PROBE = """
import json, random, sys
import numpy as np, torch
from megatron.core import dist_checkpointing, tensor_parallel
from training import checkpoint
from training.config import resolve_stage_config
from training.parallel.setup import init_distributed, shutdown

init_distributed(resolve_stage_config("pretrain", "tiny").parallel, seed=3)

def draws():
    with tensor_parallel.get_cuda_rng_tracker().fork():   # dropout's generator under tensor parallelism
        tracker = torch.rand(1).item()
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(1).item(),
            "tracker": tracker}

draws()   # move every generator off its seed
dist_checkpointing.save({"rng_state": checkpoint._rng_sharded_object()}, sys.argv[1])
after_save = draws()
loaded = dist_checkpointing.load({"rng_state": checkpoint._rng_sharded_object()}, sys.argv[1])
checkpoint.restore_rng_states(loaded["rng_state"])
after_load = draws()
checkpoint.restore_rng_states({"torch": loaded["rng_state"]["torch"]})   # a checkpoint from before: torch only
torch_only = draws()
print(json.dumps({"saved": sorted(loaded["rng_state"]), "after_save": after_save, "after_load": after_load,
                  "torch_only": torch_only}))
shutdown()
"""


def test_every_generator_resumes_where_the_save_left_it(tmp_path):
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PROBE, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["saved"] == ["numpy", "python", "torch", "tracker"]   # no "cuda": this machine has none
    assert report["after_load"] == report["after_save"]
    # An old checkpoint restores torch's generator and leaves the others running on.
    assert report["torch_only"]["torch"] == report["after_save"]["torch"]
    for name in ("python", "numpy", "tracker"):
        assert report["torch_only"][name] != report["after_save"][name], name
