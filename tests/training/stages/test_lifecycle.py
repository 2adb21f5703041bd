"""The one stage lifecycle (training/stages/lifecycle.py): skip when done, invalidate before the body, write the
manifest last, and only on rank 0."""
from __future__ import annotations

import json

import pytest

from training.config import PromoteConfig
from training.stages.lifecycle import Outcome, run_stage


def _cfg(tmp_path, **extra) -> PromoteConfig:
    return PromoteConfig(run_root=str(tmp_path), **extra)


def _manifest(tmp_path) -> dict | None:
    path = tmp_path / "promote" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_runs_once_then_skips_until_an_input_changes(tmp_path, capsys):
    seen = []

    def body(stage):
        seen.append(_manifest(tmp_path))   # what the body finds: never a manifest
        return Outcome({"out": len(seen)}, {"m": 1.0}, {"r": len(seen)})

    first = run_stage(_cfg(tmp_path), {"a": 1}, body)
    assert first == _manifest(tmp_path)
    assert (first["stage"], first["inputs"], first["outputs"], first["result"]) == ("promote", {"a": 1}, {"out": 1},
                                                                                   {"r": 1})
    assert run_stage(_cfg(tmp_path), {"a": 1}, body) == first
    assert f"promote: already done with config {first['config_hash']}; skipping" in capsys.readouterr().out
    assert len(seen) == 1

    changed = run_stage(_cfg(tmp_path), {"a": 2}, body)           # another input: runs again
    again = run_stage(_cfg(tmp_path, seed=7), {"a": 2}, body)      # another config: runs again
    assert seen == [None, None, None] and changed["outputs"] == {"out": 2} and again["outputs"] == {"out": 3}
    assert again["config_hash"] != changed["config_hash"]


def test_still_valid_and_skip_when_done_force_a_run(tmp_path):
    calls = []

    def body(stage):
        calls.append(stage.name)
        return Outcome({})

    run_stage(_cfg(tmp_path), {}, body)
    run_stage(_cfg(tmp_path), {}, body, still_valid=lambda manifest: False)   # e.g. outputs gone
    run_stage(_cfg(tmp_path), {}, body, skip_when_done=False)               # the registry decides
    run_stage(_cfg(tmp_path), {}, body)
    assert calls == ["promote"] * 3


def test_a_failed_body_leaves_no_manifest(tmp_path):
    run_stage(_cfg(tmp_path), {"a": 1}, lambda stage: Outcome({}))

    def fails(stage):
        raise RuntimeError("half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        run_stage(_cfg(tmp_path), {"a": 2}, fails)
    assert _manifest(tmp_path) is None   # the old one must not vouch for half-written outputs


def test_only_rank_zero_invalidates_and_writes(tmp_path, monkeypatch):
    old = run_stage(_cfg(tmp_path), {"a": 1}, lambda stage: Outcome({}))
    monkeypatch.setenv("RANK", "1")
    ran = []

    def body(stage):
        ran.append(stage.writes)
        return Outcome({"x": 1})

    assert run_stage(_cfg(tmp_path), {"a": 2}, body) is None
    assert ran == [False] and _manifest(tmp_path) == old   # rank 0 (not this process) replaces it
