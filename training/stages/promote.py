"""The `promote` stage: eval-gated promotion of a registered version with MLflow aliases (never registry stages).

    candidate ──(gated metrics present and within absolute bounds)──► staging
              ──(no gated metric worse than the champion's by more than its max_regression)──► champion

The gated metrics are the version tags `seekflow.eval.<suite>.<metric>` that `evaluate` (or `register`, copying the
evaluate manifest) wrote. Everything is read and checked before the first write, so bad input — an unreachable
tracking server, an unknown model, version or alias, a missing or non-numeric metric tag — fails with a clear error
and leaves the registry as it was. A refused candidate keeps its aliases and the champion stays where it is.

The decision is recorded on the version (`seekflow.promotion.*` tags), in the stage's MLflow run and in its manifest.
Re-running for the same version changes nothing: the current champion reports its recorded decision, any other
version is gated again against the same champion, and only tags or aliases that differ are written (none, so no new
MLflow run is opened either).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from training import storage
from training.config import PromoteConfig, config_hash
from training.config.models import GateRule
from training.manifest import invalidate, manifest_uri, write_manifest
from training.tracking import stage_run, tracking_uri, unreachable_reason

STAGE = "promote"
CANDIDATE, STAGING, CHAMPION = "candidate", "staging", "champion"
EVAL_TAG = "seekflow.eval."
TAG = "seekflow.promotion."
DECISION, REASON, COMPARED, PREVIOUS, RUN_ID = (TAG + k for k in
                                                ("decision", "reason", "compared", "previous_champion", "run_id"))
TOLERANCE = 1e-9     # tags hold `%.6g` text: equal values parse to equal floats, this only absorbs float noise


class PromoteError(RuntimeError):
    """Bad input, found before any write: the registry is unchanged."""


class PromotionRefused(RuntimeError):
    """`fail_on_refusal`: the candidate was refused (the decision is already recorded on the version)."""


@dataclass
class Decision:
    decision: str                                    # champion | staging | refused
    reason: str
    compared: dict[str, dict] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()                    # aliases this version gets


# ------------------------------------------------------------------------------------------------- the gate logic --
def decide(gates: list[GateRule], candidate: dict[str, float], champion: dict[str, float] | None,
           champion_version: str | None, allow_first_champion: bool = True) -> Decision:
    """The promotion decision from the candidate's and the champion's metric values (pure: no registry access).

    A metric the champion lacks (a gate added after it was promoted) is not compared; `champion` is null for it."""
    compared, out_of_bounds, regressions = {}, [], []
    for g in gates:
        value = candidate[g.metric]
        in_bounds = (g.min is None or value >= g.min) and (g.max is None or value <= g.max)
        if not in_bounds:
            limit = f"below min {g.min:g}" if g.min is not None and value < g.min else f"above max {g.max:g}"
            out_of_bounds.append(f"{g.metric} = {value:g} {limit}")
        best = None if champion is None else champion.get(g.metric)
        ok = in_bounds
        if best is not None:
            worse_by = (best - value) if g.higher_is_better else (value - best)
            if worse_by > g.max_regression + TOLERANCE:
                ok = False
                better = "higher" if g.higher_is_better else "lower"
                regressions.append(f"{g.metric} {value:g} vs champion {best:g} (worse by {worse_by:.4g}, "
                                   f"{better} is better, max_regression {g.max_regression:g})")
        compared[g.metric] = {"candidate": value, "champion": best, "max_regression": g.max_regression,
                              "higher_is_better": g.higher_is_better, "ok": ok}
    if out_of_bounds:
        return Decision("refused", "outside the absolute bounds: " + "; ".join(out_of_bounds), compared)
    if champion_version is None:
        if allow_first_champion:
            return Decision(CHAMPION, "no champion yet; every gated metric is within its absolute bounds", compared,
                            (STAGING, CHAMPION))
        return Decision(STAGING, "no champion yet and allow_first_champion is false: waiting in staging", compared,
                        (STAGING,))
    if regressions:
        # No new alias: `staging` means "passed every gate", so a refused version never holds it.
        return Decision("refused", f"worse than champion v{champion_version}: " + "; ".join(regressions), compared)
    unchecked = [m for m, row in compared.items() if row["champion"] is None]
    note = f" ({', '.join(unchecked)} not compared: the champion has no value)" if unchecked else ""
    return Decision(CHAMPION, f"not worse than champion v{champion_version} by more than max_regression on any "
                              f"gated metric{note}", compared, (STAGING, CHAMPION))


# ---------------------------------------------------------------------------------------------------- the stage --
def run(cfg: PromoteConfig) -> dict:
    started = time.time()
    uri = tracking_uri(cfg)
    check_tracking_server(uri, cfg.request_timeout_s)
    name, ref = _target(cfg)
    client = _client(uri)
    aliases, version = _resolve(client, name, ref)
    cand_tags = client.get_model_version(name, version).tags
    candidate = metric_values(cand_tags, cfg.gates, f"{name} v{version}")
    champion_version = aliases.get(CHAMPION)

    if champion_version == version and cand_tags.get(DECISION) == CHAMPION:
        recorded = Decision(CHAMPION, cand_tags.get(REASON, ""), json.loads(cand_tags.get(COMPARED) or "{}"))
        print(f"promote: {name} v{version} is already the champion; nothing to change", flush=True)
        return _finish(cfg, started, name, version, recorded, cand_tags.get(PREVIOUS) or None, candidate,
                       {**aliases}, cand_tags.get(RUN_ID))
    if champion_version == version:    # the alias was set by hand: record it, gate nothing
        decision = decide(cfg.gates, candidate, None, None, True)
        decision.reason = "already the champion (alias set outside promote); bounds only: " + decision.reason
        decision.decision, decision.aliases = CHAMPION, ()
        previous = None
    else:
        previous = champion_version
        champ_tags = client.get_model_version(name, previous).tags if previous else None
        champion = None if champ_tags is None else metric_values(champ_tags, cfg.gates, f"champion v{previous}",
                                                                 missing_ok=True)
        decision = decide(cfg.gates, candidate, champion, previous, cfg.allow_first_champion)

    # Everything above only read. From here on the registry changes, and only where it differs.
    new_tags = {DECISION: decision.decision, REASON: decision.reason[:4000],
                COMPARED: json.dumps(decision.compared, sort_keys=True), PREVIOUS: previous or ""}
    changed_tags = {k: v for k, v in new_tags.items() if cand_tags.get(k) != v}
    changed_aliases = [a for a in decision.aliases if aliases.get(a) != version]
    run_id = cand_tags.get(RUN_ID)
    if changed_tags or changed_aliases or not run_id:
        invalidate(cfg.run_root, STAGE)
        with stage_run(cfg, STAGE, config_hash(cfg)) as mlflow_run:
            import mlflow

            run_id = mlflow_run.info.run_id
            mlflow.set_tags({**new_tags, TAG + "model_version": f"models:/{name}/{version}"})
            mlflow.log_metrics({f"{side}/{m}": row[side] for m, row in decision.compared.items()
                                for side in ("candidate", "champion") if row[side] is not None})
            mlflow.log_dict({"model_name": name, "version": version, "decision": decision.decision,
                             "reason": decision.reason, "compared": decision.compared, "previous_champion": previous,
                             "aliases": list(decision.aliases)}, "promotion/decision.json")
            # Tags first, aliases last: a crash in between leaves a version that a rerun gates again, never a
            # champion without its recorded decision.
            for key, value in {**new_tags, RUN_ID: run_id}.items():
                client.set_model_version_tag(name, version, key, value)
            for alias in decision.aliases:
                if aliases.get(alias) != version:
                    client.set_registered_model_alias(name, alias, version)
                    print(f"promote: alias {alias!r} -> {name} v{version}"
                          + (f" (was v{aliases[alias]})" if alias in aliases else ""), flush=True)
                    aliases[alias] = version
    else:
        print(f"promote: {name} v{version} already carries this decision; nothing to change", flush=True)
    print(f"promote: {name} v{version}: {decision.decision} — {decision.reason}", flush=True)
    if decision.decision == "refused" and cfg.fail_on_refusal:   # recorded on the version and its run; no manifest
        invalidate(cfg.run_root, STAGE)
        raise PromotionRefused(f"{name} v{version} refused: {decision.reason}")
    return _finish(cfg, started, name, version, decision, previous, candidate, aliases, run_id)


def _finish(cfg: PromoteConfig, started: float, name: str, version: str, decision: Decision, previous: str | None,
            candidate: dict[str, float], aliases: dict[str, str], run_id: str | None) -> dict:
    held = [a for a in (CHAMPION, STAGING, CANDIDATE) if aliases.get(a) == version]
    held += sorted(a for a, v in aliases.items() if v == version and a not in held)
    result = {"model_name": name, "version": version, "decision": decision.decision,
              "alias": held[0] if held else None, "reason": decision.reason, "compared": decision.compared,
              "previous_champion": previous, "champion": aliases.get(CHAMPION)}
    inputs = {"model_version": f"models:/{name}/{version}", "champion_before": previous,
              "gates": [g.model_dump(mode="json") for g in cfg.gates]}
    outputs = {**result, "aliases": held, "mlflow_run_id": run_id}
    return write_manifest(cfg.run_root, STAGE, config_hash=config_hash(cfg), inputs=inputs, outputs=outputs,
                          metrics=candidate, started=started, result=result)


# ---------------------------------------------------------------------------------------- reading the registry --
def check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast before any write: MLflow's own client retries an unreachable server for minutes."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise PromoteError(f"no MLflow registry at {uri} (the file does not exist); nothing to promote")
        return
    problem = unreachable_reason(uri, timeout_s)
    if problem is not None:
        raise PromoteError(f"MLflow tracking server {uri} is unreachable ({problem}); nothing was promoted")


def _client(uri: str):
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _target(cfg: PromoteConfig) -> tuple[str, str]:
    """(model name, version number or alias): config first, then the register stage's manifest, then @candidate."""
    text = storage.read_text(manifest_uri(cfg.run_root, "register"))
    registered = json.loads(text)["outputs"] if text else {}
    name = cfg.model_name or registered.get("model_name") or f"seekflow-{cfg.profile}"
    if cfg.version:
        return name, cfg.version
    if registered.get("model_name") == name and registered.get("version"):
        return name, str(registered["version"])
    return name, CANDIDATE


def _resolve(client, name: str, ref: str) -> tuple[dict[str, str], str]:
    """(the model's aliases → version, the version number `ref` names), or PromoteError."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        raise PromoteError(f"no registered model {name!r} ({err.error_code}); nothing to promote") from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    if not versions:
        raise PromoteError(f"registered model {name!r} has no versions; run the register stage first")
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    if not ref.isdigit():
        alias = ref.removeprefix("@")
        if alias not in aliases:
            raise PromoteError(f"{name} has no alias {alias!r} (aliases: {_listing(aliases)})")
        return aliases, aliases[alias]
    if ref not in versions:
        raise PromoteError(f"{name} has no version {ref} (versions: {', '.join(versions)})")
    return aliases, ref


def _listing(aliases: dict[str, str]) -> str:
    return ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "none"


def metric_values(tags: dict[str, str], gates: list[GateRule], who: str, missing_ok: bool = False) -> dict[str, float]:
    """The gated metrics from `seekflow.eval.*` version tags; a missing or non-finite one is a PromoteError (or,
    with missing_ok, simply absent)."""
    values, problems = {}, []
    for g in gates:
        text = tags.get(EVAL_TAG + g.metric)
        try:
            value = float(text) if text is not None else None
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            values[g.metric] = value
        elif not missing_ok:
            problems.append(f"{EVAL_TAG}{g.metric} is missing" if text is None
                            else f"{EVAL_TAG}{g.metric} = {text!r} is not a finite number")
    if problems:
        raise PromoteError(f"{who} cannot be gated: {'; '.join(problems)} (run the evaluate stage on it, or change "
                           f"promote.gates); nothing was promoted")
    return values
