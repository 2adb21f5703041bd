"""Promotion is a compare-and-swap: two promotions racing on one champion cannot both win (against a real MLflow
server on loopback). The lock itself: a contender waits and then fails naming the holder, a crashed holder's stale
lock is stolen, and a holder whose lock was stolen moves no alias."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from training.config import resolve_stage_config
from training.promotion_lock import (ACQUIRED_AT, LOCK_SUFFIX, OWNER, PURPOSE, ChampionMoved, PromotionLock,
                                     PromotionLockError)
from training.stages import promote

GATES = [{"metric": "arith.accuracy", "higher_is_better": True, "max_regression": 0.0, "min": 0.0, "max": 1.0}]


@pytest.fixture()
def client(mlflow_server):
    import mlflow
    from mlflow import MlflowClient

    yield MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mlflow.set_tracking_uri(None)


def _model(client, accuracies: list[float]) -> str:
    """A registered model with one version per accuracy (its seekflow.eval tag); v1 is the champion."""
    name = f"seekflow-race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    experiment = client.get_experiment_by_name("promote-race")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("promote-race")
    for accuracy in accuracies:
        run_id = client.create_run(experiment_id).info.run_id
        version = client.create_model_version(name, source=f"runs:/{run_id}/release", run_id=run_id).version
        client.set_model_version_tag(name, version, "seekflow.eval.arith.accuracy", f"{accuracy:.6g}")
    client.set_registered_model_alias(name, "champion", "1")
    return name


def _promote(run_root, server: str, name: str, version: str) -> dict:
    cfg = resolve_stage_config("promote", "tiny", overrides={
        "run_root": str(run_root), "tracking.uri": server, "model_name": name, "version": version, "gates": GATES})
    return promote.run(cfg)["result"]


def _lock_exists(client, name: str) -> bool:
    return PromotionLock(client, name, "probe").read() is not None


def test_two_promotions_racing_on_one_champion_cannot_both_win(client, mlflow_server, tmp_path, monkeypatch):
    name = _model(client, [0.5, 0.6, 0.7])   # v2 and v3 both beat champion v1
    barrier = threading.Barrier(2, timeout=60)
    real_gate = promote.gate

    def gate_then_race(*args, **kwargs):   # both decide against v1, then race to record
        gating = real_gate(*args, **kwargs)
        barrier.wait()
        return gating

    monkeypatch.setattr(promote, "gate", gate_then_race)
    outcomes: dict[str, object] = {}

    def run(version):
        try:
            outcomes[version] = _promote(tmp_path / f"v{version}", mlflow_server, name, version)
        except BaseException as exc:   # noqa: BLE001 - asserted below
            outcomes[version] = exc

    threads = [threading.Thread(target=run, args=(v,)) for v in ("2", "3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)

    won = [v for v, out in outcomes.items() if isinstance(out, dict)]
    lost = [v for v, out in outcomes.items() if isinstance(out, ChampionMoved)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    winner, loser = won[0], lost[0]
    assert outcomes[winner]["decision"] == "champion" and outcomes[winner]["previous_champion"] == "1"
    message = str(outcomes[loser])
    assert f"v{loser} was gated against champion v1, but the champion is now v{winner}" in message
    assert str(client.get_registered_model(name).aliases["champion"]) == winner
    assert "seekflow.promotion.decision" not in client.get_model_version(name, loser).tags   # wrote nothing
    assert not _lock_exists(client, name)

    # The loser's retry gates against the winner: v3 beats v2; v2 is worse than v3 and refused.
    monkeypatch.setattr(promote, "gate", real_gate)
    again = _promote(tmp_path / f"v{loser}-retry", mlflow_server, name, loser)
    assert again["previous_champion"] == winner
    assert again["decision"] == ("champion" if loser == "3" else "refused")
    assert str(client.get_registered_model(name).aliases["champion"]) == "3"


def test_a_contender_waits_then_fails_naming_the_holder(client):
    name = _model(client, [0.5])
    holder = PromotionLock(client, name, "promote: holder")
    holder.acquire()
    try:
        contender = PromotionLock(client, name, "promote: contender", wait_s=0.6, poll_s=0.1, log=lambda line: None)
        started = time.monotonic()
        with pytest.raises(PromotionLockError, match=rf"could not take {name}{LOCK_SUFFIX} within 0.6s: held by "
                                                     rf"{holder.owner} \(promote: holder\)"):
            contender.acquire()
        assert 0.5 < time.monotonic() - started < 30
    finally:
        holder.release()
    assert not _lock_exists(client, name)
    contender.acquire()   # free again
    contender.release()


def test_a_stale_lock_is_stolen_and_its_old_holder_moves_nothing(client):
    name = _model(client, [0.5])
    crashed = PromotionLock(client, name, "promote: crashed")
    crashed.acquire()
    client.set_registered_model_tag(name + LOCK_SUFFIX, ACQUIRED_AT, f"{time.time() - 3600:.3f}")   # an hour ago
    lines: list[str] = []
    thief = PromotionLock(client, name, "promote: next", stale_after_s=60, wait_s=5, log=lines.append)
    thief.acquire()
    assert any("stealing it from " + crashed.owner in line for line in lines)
    tags = client.get_registered_model(name + LOCK_SUFFIX).tags
    assert tags[OWNER] == thief.owner and tags[PURPOSE] == "promote: next"
    with pytest.raises(PromotionLockError, match=r"lost .* \(now held by " + thief.owner):
        crashed.check_held()
    crashed.release()   # not its lock any more: left alone
    assert _lock_exists(client, name)
    thief.check_held()
    thief.release()
    assert not _lock_exists(client, name)
