"""The `promote` stage: eval-gated promotion of a registered version with MLflow aliases (never registry stages).

    candidate ──(gated metrics present and within absolute bounds)──► staging
              ──(no gated metric worse than the champion's by more than its max_regression)──► champion

The gated metrics are the version tags `seekflow.eval.<suite>.<metric>` that `evaluate` (or `register`, copying the
evaluate manifest) wrote; the decision is training.promotion's. Everything is read and checked before the first
write, so bad input — an unreachable tracking server, an unknown model, version or alias (RegistryError), a missing
or non-numeric metric tag (PromoteError) — fails with a clear error and leaves the registry as it was. A refused
candidate keeps its aliases and the champion stays where it is.

The decision is recorded on the version (`seekflow.promotion.*` tags), in the stage's MLflow run and in its manifest.
Re-running for the same version changes nothing: the current champion reports its recorded decision, any other
version is gated again against the same champion, and only tags or aliases that differ are written (none, so no new
MLflow run is opened either).

Moving an alias is a compare-and-swap (training/promotion_lock.py): under an MLflow-side lock, the champion is read
again, and the decision is recorded only if it is still the version the candidate was gated against. Two promotions
racing on one champion cannot both win: the loser writes nothing and fails naming both versions; its retry gates
against the winner.
"""
from __future__ import annotations

import contextlib
import json

from training import registry, storage
from training.config import PromoteConfig
from training.config.registry import registered_model_name
from training.manifest import manifest_uri
from training.promotion import CANDIDATE, CHAMPION, RUN_ID, STAGING, TAG, Gating, PromotionRefused, gate
from training.promotion_lock import expect_alias, promotion_lock
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.tracking import tracking_uri


def run(cfg: PromoteConfig) -> dict:
    uri = tracking_uri(cfg)
    registry.check_tracking_server(uri, cfg.request_timeout_s, require_registry=True)
    name, ref = _target(cfg)
    client = registry.mlflow_client(uri)
    gating = gate(client, name, ref, cfg.gates, cfg.allow_first_champion)
    inputs = {"model_version": f"models:/{name}/{gating.version}", "champion_before": gating.previous,
              "gates": [g.model_dump(mode="json") for g in cfg.gates]}
    # Always runs: the registry holds what was decided (a rerun for the same version changes nothing there).
    return run_stage(cfg, inputs, lambda stage: record(cfg, stage, client, gating), skip_when_done=False)


def record(cfg: PromoteConfig, stage: StageRun, client, gating: Gating) -> Outcome:
    """Record the decision: version tags first, aliases last, and only what differs (nothing differs: no MLflow run)."""
    name, version, decision, aliases = gating.name, gating.version, gating.decision, gating.aliases
    run_id = gating.tags.get(RUN_ID)
    if gating.recorded:
        print(f"{stage.name}: {name} v{version} is already the champion; nothing to change", flush=True)
        return _outcome(gating, run_id)
    new_tags = gating.decision_tags()
    changed_tags = {k: v for k, v in new_tags.items() if gating.tags.get(k) != v}
    changed_aliases = [a for a in decision.aliases if aliases.get(a) != version]
    if changed_tags or changed_aliases or not run_id:
        # Moving an alias: under the lock, and only if the champion is still the one this decision compared.
        guard = (promotion_lock(client, name, f"{stage.name}: {name} v{version}") if changed_aliases
                 else contextlib.nullcontext())
        with guard as lock:
            if lock is not None:
                expect_alias(client, name, CHAMPION, aliases.get(CHAMPION), version)
            run_id = _write(stage, client, gating, new_tags, lock)
    else:
        print(f"{stage.name}: {name} v{version} already carries this decision; nothing to change", flush=True)
    print(f"{stage.name}: {name} v{version}: {decision.decision} — {decision.reason}", flush=True)
    if decision.decision == "refused" and cfg.fail_on_refusal:   # recorded on the version and its run; no manifest
        raise PromotionRefused(f"{name} v{version} refused: {decision.reason}")
    return _outcome(gating, run_id)


def _write(stage: StageRun, client, gating: Gating, new_tags: dict[str, str], lock) -> str:
    """The decision into a new MLflow run and the version's tags, then the aliases; returns the run id."""
    name, version, decision, aliases = gating.name, gating.version, gating.decision, gating.aliases
    with stage.tracking() as mlflow_run:
        import mlflow

        run_id = mlflow_run.info.run_id
        mlflow.set_tags({**new_tags, TAG + "model_version": f"models:/{name}/{version}"})
        mlflow.log_metrics({f"{side}/{m}": row[side] for m, row in decision.compared.items()
                            for side in ("candidate", "champion") if row[side] is not None})
        mlflow.log_dict({"model_name": name, "version": version, "decision": decision.decision,
                         "reason": decision.reason, "compared": decision.compared,
                         "previous_champion": gating.previous, "aliases": list(decision.aliases)},
                        "promotion/decision.json")
        # Tags first, aliases last: a crash in between leaves a version that a rerun gates again, never a
        # champion without its recorded decision.
        registry.tag_version(client, name, version, {**new_tags, RUN_ID: run_id})
        if lock is not None:
            lock.check_held()   # not stolen as stale while we wrote
        for alias in decision.aliases:
            if aliases.get(alias) != version:
                client.set_registered_model_alias(name, alias, version)
                print(f"{stage.name}: alias {alias!r} -> {name} v{version}"
                      + (f" (was v{aliases[alias]})" if alias in aliases else ""), flush=True)
                aliases[alias] = version
    return run_id


def _outcome(gating: Gating, run_id: str | None) -> Outcome:
    version, aliases = gating.version, gating.aliases
    held = [a for a in (CHAMPION, STAGING, CANDIDATE) if aliases.get(a) == version]
    held += sorted(a for a, v in aliases.items() if v == version and a not in held)
    result = {"model_name": gating.name, "version": version, "decision": gating.decision.decision,
              "alias": held[0] if held else None, "reason": gating.decision.reason,
              "compared": gating.decision.compared, "previous_champion": gating.previous,
              "champion": aliases.get(CHAMPION)}
    return Outcome({**result, "aliases": held, "mlflow_run_id": run_id}, gating.candidate, result)


def _target(cfg: PromoteConfig) -> tuple[str, str]:
    """(model name, version number or alias): config first, then the register stage's manifest, then @candidate."""
    text = storage.read_text(manifest_uri(cfg.run_root, cfg.upstream("register")))
    registered = json.loads(text)["outputs"] if text else {}
    name = registered_model_name(cfg.model_name or registered.get("model_name"), cfg.profile)
    if cfg.version:
        return name, cfg.version
    if registered.get("model_name") == name and registered.get("version"):
        return name, str(registered["version"])
    return name, CANDIDATE
