"""The sandbox's limits, and HumanEval's own canonical solutions scored through it (the executor's sanity check)."""
from __future__ import annotations

import time

import pytest

from tests.support.processes import pids_running
from training.benchmarks_data import load_humaneval_problems
from training.eval import humaneval
from training.verify.sandbox import Limits, run_many, run_python


def test_a_clean_exit_passes_and_an_exception_fails_with_its_line():
    assert run_python("print('hi')").status == "passed"
    bad = run_python("def f():\n    raise ValueError('boom')\nf()\n")
    assert (bad.status, bad.reason) == ("failed", "ValueError: boom")
    assert "Traceback" in bad.stderr_tail


def test_an_infinite_loop_times_out_on_wall_time():
    started = time.monotonic()
    out = run_python("while True:\n    pass\n", Limits(wall_s=1.0, cpu_s=30))
    assert out.status == "timeout" and "wall time" in out.reason
    assert time.monotonic() - started < 5


def test_cpu_time_limit_is_enforced_by_the_kernel():
    out = run_python("while True:\n    pass\n", Limits(wall_s=30, cpu_s=1))
    assert out.status == "timeout" and "CPU time limit (1 s)" in out.reason
    assert out.seconds < 10


def test_too_much_memory_fails_with_a_memory_reason():
    out = run_python("x = bytearray(2 * 1024 ** 3)\n", Limits(memory_mb=256))
    assert out.status == "failed"
    assert out.reason.startswith("memory limit (256 MiB) exceeded")


def test_output_flood_is_capped():
    out = run_python("while True:\n    print('x' * 1000)\n", Limits(output_kb=64))
    assert out.status == "failed" and out.reason == "output limit (64 KiB) exceeded"


def test_child_gets_eof_on_stdin_a_private_scratch_dir_its_limits_and_a_bare_environment():
    program = ("import os, resource, sys\n"
               "assert sys.stdin.read() == ''\n"
               "assert os.getcwd() == '/sandbox' and sorted(os.listdir('/sandbox')) == ['program.py']\n"
               "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
               "assert resource.getrlimit(resource.RLIMIT_NPROC) == (64, 64)\n"
               "assert set(os.environ) <= {'PATH', 'HOME', 'LANG', 'PYTHONHASHSEED', 'OMP_NUM_THREADS', 'LC_CTYPE',"
               " 'PWD'}, sorted(os.environ)\n"
               "assert sys.flags.isolated and not any('site-packages' in p for p in sys.path), sys.path\n")
    out = run_python(program)
    assert out.status == "passed", out


def test_background_children_are_killed_with_the_sandbox():
    # The orphan would write into the scratch dir, which is gone with the sandbox: look for it by process instead.
    program = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    time.sleep(30)\n")
    before = set(pids_running("program.py"))
    out = run_python(program)
    assert out.status == "passed", out
    assert set(pids_running("program.py")) <= before   # nothing the program started is still running



def test_canonical_solutions_all_pass_and_wrong_ones_all_fail():
    problems = load_humaneval_problems()
    assert len(problems) == 164
    results = humaneval.execute(problems, [[p["canonical_solution"]] for p in problems], workers=2)
    failures = [(r.task_id, r.outcome.reason) for r in results if r.outcome.status != "passed"]
    assert failures == []
    assert humaneval.score(results, [1])["pass_at_1"] == 1.0

    wrong = humaneval.execute(problems[:8], [["    return None\n"]] * 8, workers=2)
    assert humaneval.score(wrong, [1])["pass_at_1"] == 0.0
    assert {r.outcome.status for r in wrong} == {"failed"}


def test_run_many_keeps_order():
    outs = run_many([f"raise SystemExit({i % 2})" for i in range(6)], workers=3)
    assert [o.status for o in outs] == ["passed", "failed"] * 3


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),            # 1 - C(3,1)/C(5,1) = 1 - 3/5
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 4, 1.0),            # n - c < k: every k-subset holds a correct sample
    (10, 0, 3, 0.0),
    (10, 10, 1, 1.0),
    (200, 1, 100, 0.5),        # 1 - C(199,100)/C(200,100) = 1 - 100/200
    (20, 3, 5, 1 - (17 * 16 * 15 * 14 * 13) / (20 * 19 * 18 * 17 * 16)),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 1, 4)


def test_score_averages_pass_at_k_over_problems():
    from training.eval.humaneval import ItemResult
    from training.verify.spec import Outcome

    ok, bad = Outcome("passed", "ok", 0.1), Outcome("failed", "AssertionError", 0.1)
    results = [ItemResult("A", 0, "", ok), ItemResult("A", 1, "", bad),      # problem A: n=2, c=1
               ItemResult("B", 0, "", bad), ItemResult("B", 1, "", bad)]     # problem B: n=2, c=0
    metrics = humaneval.score(results, [1, 2])
    assert metrics["pass_at_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["pass_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    assert (metrics["problems"], metrics["passed"], metrics["failed"]) == (2, 1, 3)


def test_truncate_stops_at_the_papers_stop_sequences():
    raw = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert humaneval.truncate(raw) == "    return x + 1\n\n"
    assert humaneval.truncate("    return 1\nprint(2)") == "    return 1"
    assert humaneval.truncate("    return 1") == "    return 1"
