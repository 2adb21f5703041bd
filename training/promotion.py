"""Eval-gated promotion of a registered version with MLflow aliases (never registry stages): the decision, and what
it reads from the registry to make it.

    candidate ──(gated metrics present and within absolute bounds)──► staging
              ──(no gated metric worse than the champion's by more than its max_regression)──► champion

The gated metrics are the version tags `seekflow.eval.<suite>.<metric>` that `evaluate` (or `register`, copying the
evaluate manifest) wrote. `gate` only reads; the promote stage records its `Gating` (training/stages/promote.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from training.config import GateRule
from training.registry import EVAL_TAG, registered_version

CANDIDATE, STAGING, CHAMPION = "candidate", "staging", "champion"
TAG = "seekflow.promotion."
DECISION, REASON, COMPARED, PREVIOUS, RUN_ID = (TAG + k for k in
                                                ("decision", "reason", "compared", "previous_champion", "run_id"))
TOLERANCE = 1e-9     # tags hold `%.6g` text: equal values parse to equal floats, this only absorbs float noise


class PromoteError(RuntimeError):
    """The version cannot be gated (a gated metric is missing or not a number): the registry is unchanged."""

    permanent = True   # bad input: the task is not retried (training/__main__.py)


class PromotionRefused(RuntimeError):
    """`fail_on_refusal`: the candidate was refused (the decision is already recorded on the version)."""

    permanent = True   # the same scores would be refused again: the task is not retried


@dataclass
class Decision:
    decision: str                                    # champion | staging | refused
    reason: str
    compared: dict[str, dict] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()                    # aliases this version gets


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


@dataclass
class Gating:
    """Everything promote reads before its first write: the version, the model's aliases, the decision."""

    name: str
    version: str
    aliases: dict[str, str]          # alias -> version, before this promotion
    tags: dict[str, str]             # the candidate version's tags
    candidate: dict[str, float]      # its gated metric values
    decision: Decision
    previous: str | None             # the champion it was compared with (None: none, or itself)
    recorded: bool = False           # already the champion by an earlier promotion: nothing to decide or write

    def decision_tags(self) -> dict[str, str]:
        return {DECISION: self.decision.decision, REASON: self.decision.reason[:4000],
                COMPARED: json.dumps(self.decision.compared, sort_keys=True), PREVIOUS: self.previous or ""}


def gate(client, name: str, ref: str, gates: list[GateRule], allow_first_champion: bool) -> Gating:
    """Resolve `ref` (a version number or an alias) of model `name`, read its and the champion's metrics and decide.
    Read-only: unknown models, versions or aliases are RegistryErrors, ungatable metrics PromoteErrors."""
    aliases, version = registered_version(client, name, ref)
    tags = client.get_model_version(name, version).tags
    candidate = metric_values(tags, gates, f"{name} v{version}")
    champion_version = aliases.get(CHAMPION)
    if champion_version == version and tags.get(DECISION) == CHAMPION:
        recorded = Decision(CHAMPION, tags.get(REASON, ""), json.loads(tags.get(COMPARED) or "{}"))
        return Gating(name, version, aliases, tags, candidate, recorded, tags.get(PREVIOUS) or None, recorded=True)
    if champion_version == version:    # the alias was set by hand: record it, gate nothing
        decision = decide(gates, candidate, None, None, True)
        decision.reason = "already the champion (alias set outside promote); bounds only: " + decision.reason
        decision.decision, decision.aliases = CHAMPION, ()
        return Gating(name, version, aliases, tags, candidate, decision, None)
    champ_tags = client.get_model_version(name, champion_version).tags if champion_version else None
    champion = None if champ_tags is None else metric_values(champ_tags, gates, f"champion v{champion_version}",
                                                             missing_ok=True)
    decision = decide(gates, candidate, champion, champion_version, allow_first_champion)
    return Gating(name, version, aliases, tags, candidate, decision, champion_version)


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
