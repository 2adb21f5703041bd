"""The registry stages' configs: register (a checkpoint becomes a model version) and promote (eval-gated aliases)."""
from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from training.config.base import Section, StageConfig, StageInput, StageSpec


def registered_model_name(name: str | None, profile: str) -> str:
    """The registered model a register or promote stage names: `name` with `{profile}` replaced by the profile
    (`seekflow-{profile}-student`), default seekflow-<profile>."""
    return (name or "seekflow-{profile}").replace("{profile}", profile)


class RegisterConfig(StageConfig):
    """Registers the pretrain stage's release (with the evaluate stage's scores, when it ran) as a model version."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        kind="register", retries=2, retry_delay_minutes=2, timeout_minutes=2 * 60,   # uploads the release
        inputs=(StageInput("checkpoint", upstream="pretrain"), StageInput(upstream="evaluate", required=False)),
        form_fields=("model_name", "alias"))

    checkpoint: str | None = Field(None, description="Checkpoint to register; default the pretrain stage's final one.")
    model_name: str | None = Field(None, description="Registered model name; default seekflow-<profile>. "
                                                     "`{profile}` in it is replaced by the profile.")
    alias: str = Field("candidate", pattern=r"^[a-z][a-z0-9_-]*$")
    parent_version: str | None = Field(None, description="The registered version this checkpoint was trained from "
                                                         "(models:/name/version), recorded as lineage.")
    export_hf: bool = Field(True, description="Log a Hugging Face DeepseekV3 export (hf/) with the version.")


class GateRule(Section):
    """One gated metric: the version tag `seekflow.eval.<metric>` that the evaluate stage writes."""

    metric: str = Field(..., pattern=r"^[\w-]+\.[\w.-]+$",
                        description="<suite>.<metric>, e.g. humaneval.pass_at_1 (eval/<suite>/<metric> also accepted).")
    higher_is_better: bool = Field(..., description="False for losses and perplexities.")
    max_regression: float = Field(0.0, ge=0, description="Largest absolute step in the worse direction, versus the "
                                                         "current champion, that still promotes.")
    min: float | None = Field(None, description="Absolute lower bound: below it the candidate is refused.")
    max: float | None = Field(None, description="Absolute upper bound: above it the candidate is refused.")

    @model_validator(mode="before")
    @classmethod
    def _metric_name(cls, data):
        metric = data.get("metric") if isinstance(data, dict) else None
        if isinstance(metric, str) and metric.startswith("eval/"):   # the MLflow metric name of the same value
            data = {**data, "metric": metric[len("eval/"):].replace("/", ".", 1)}
        return data

    @model_validator(mode="after")
    def _check(self) -> "GateRule":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.metric}: min ({self.min}) exceeds max ({self.max})")
        return self


def _default_gates() -> list[GateRule]:
    accuracy = dict(higher_is_better=True, max_regression=0.02, min=0.0, max=1.0)
    perplexity = dict(higher_is_better=False, max_regression=0.5, min=1.0)
    return [GateRule(metric="perplexity.stdlib_code", **perplexity),
            GateRule(metric="perplexity.stdlib_docstrings", **perplexity),
            GateRule(metric="humaneval.pass_at_1", **accuracy), GateRule(metric="fim.exact_match", **accuracy),
            GateRule(metric="passkey.accuracy", **accuracy), GateRule(metric="arith.accuracy", **accuracy)]


class PromoteConfig(StageConfig):
    """Eval-gated promotion with registry aliases: candidate → staging (metrics present, within bounds) → champion
    (no gated metric worse than the current champion's by more than its max_regression)."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # Short; a retry after a lost compare-and-swap gates again against the champion that won.
        kind="promote", retries=2, retry_delay_minutes=1, timeout_minutes=15,
        # Without a register stage before it, it promotes the candidate alias of seekflow-<profile>.
        inputs=(StageInput("model_name", upstream="register", required=False),
                StageInput("version", upstream="register", required=False)),
        form_fields=("gates", "allow_first_champion", "fail_on_refusal"))

    model_name: str | None = Field(None, description="Registered model; default: the register stage's (its manifest "
                                                     "under run_root), else seekflow-<profile>. `{profile}` in it is "
                                                     "replaced by the profile.")
    version: str | None = Field(None, pattern=r"^(\d+|@?[a-z][a-z0-9_-]*)$",
                                description="Version number or alias (e.g. candidate) to promote; default: the "
                                            "version the register stage's manifest names, else the candidate alias.")
    gates: list[GateRule] = Field(default_factory=_default_gates, min_length=1,
                                  description="Gated metrics (seekflow.eval.<metric> version tags).")
    allow_first_champion: bool = Field(True, description="With no champion yet, a candidate within the absolute "
                                                         "bounds becomes champion (false: it stops at staging).")
    fail_on_refusal: bool = Field(False, description="Exit non-zero when the candidate is refused (the decision is "
                                                     "recorded either way).")
    request_timeout_s: float = Field(10.0, gt=0, le=300, description="Tracking-server reachability check timeout.")

    @model_validator(mode="before")
    @classmethod
    def _version_text(cls, data):
        if isinstance(data, dict) and isinstance(data.get("version"), int):   # `--set version=3` parses as YAML
            data = {**data, "version": str(data["version"])}
        return data

    @model_validator(mode="after")
    def _unique_metrics(self) -> "PromoteConfig":
        metrics = [g.metric for g in self.gates]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"gates: each metric may appear once, got {metrics}")
        return self
