"""The evaluate stage's config: which checkpoint, and the suites that score it (HumanEval, FIM, passkey, arithmetic,
perplexity).

Defaults are sized so the whole stage runs in about a minute on 2 CPU cores with the tiny model; raise them for a
real model (e.g. humaneval.max_problems: null for all 164).
"""
from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import Section, StageConfig, StageInput, StageSpec
from training.config.tasks import TasksSuite


class HumanEvalSuite(Section):
    """HumanEval (Chen et al. 2021): completions run in a sandboxed subprocess; pass@k, unbiased estimator."""

    enabled: bool = True
    max_problems: int | None = Field(10, ge=1, le=164, description="First N problems in task order (None: all 164).")
    samples_per_problem: int = Field(1, ge=1, le=200, description="n in pass@k; more than 1 needs temperature > 0.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy decoding.")
    ks: list[int] = Field(default_factory=lambda: [1], min_length=1, description="k values of pass@k (each <= n).")
    max_new_tokens: int = Field(48, ge=1, le=2048)
    timeout_s: float = Field(10.0, gt=0, le=300, description="Wall-time limit per program.")
    cpu_s: int = Field(10, ge=1, le=300, description="CPU-time limit per program (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, le=65536, description="Address-space limit per program (RLIMIT_AS).")
    workers: int = Field(2, ge=1, le=64, description="Programs run concurrently.")

    @model_validator(mode="after")
    def _check(self) -> "HumanEvalSuite":
        if self.samples_per_problem > 1 and self.temperature == 0:
            raise ValueError("samples_per_problem > 1 with temperature 0 repeats one greedy sample; set temperature")
        if max(self.ks) > self.samples_per_problem or min(self.ks) < 1:
            raise ValueError(f"every k in ks {self.ks} must be between 1 and samples_per_problem "
                             f"({self.samples_per_problem})")
        return self


class FimSuite(Section):
    """Single-line fill-in-the-middle exact match on held-out stdlib code (DeepSeek-Coder §4.3), PSM prompts."""

    enabled: bool = True
    num_spans: int = Field(20, ge=1, le=10000, description="Held-out lines to infill (one per file, seeded).")
    context_lines: int = Field(12, ge=0, le=200, description="Source lines kept on each side of the hole.")
    max_prefix_tokens: int = Field(96, ge=0, le=65536)
    max_suffix_tokens: int = Field(48, ge=0, le=65536)
    max_new_tokens: int = Field(24, ge=1, le=512)


class PasskeySuite(Section):
    """Passkey retrieval: a 5-digit key hidden in filler at each depth, for each context length (in tokens). The
    needle-in-a-haystack test of DeepSeek-V2 §3.1.4 / V3 §4.3: the (length × depth) accuracy grid is logged as the
    table eval/niah/grid.json and the heatmap eval/niah/heatmap.png."""

    enabled: bool = True
    context_lengths: list[int] = Field(default_factory=lambda: [128, 256], min_length=1,
                                       description="Prompt lengths in tokens; each must fit the model's context.")
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1,
                                description="Needle depths, 0 = start of the filler, 1 = end.")
    trials: int = Field(2, ge=1, le=1000, description="Random keys per (length, depth) cell.")
    max_new_tokens: int = Field(8, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> "PasskeySuite":
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        if any(n < 64 for n in self.context_lengths):
            raise ValueError(f"context_lengths must be at least 64 tokens, got {self.context_lengths}")
        return self


class ArithSuite(Section):
    """Generated integer arithmetic, few-shot prompted; accuracy of the extracted answer."""

    enabled: bool = True
    num_problems: int = Field(20, ge=1, le=100000)
    max_operand: int = Field(99, ge=1, le=10**9)
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-", "*"], min_length=1)
    two_step_fraction: float = Field(0.0, ge=0, le=1, description="Share of `(a op b) op c` problems.")
    few_shot: int = Field(2, ge=0, le=16, description="Worked examples before each question.")
    max_new_tokens: int = Field(8, ge=1, le=256)


class PerplexitySuite(Section):
    """Token-weighted perplexity on held-out text: the standard library's docstrings and source files."""

    enabled: bool = True
    sources: list[Literal["stdlib_docstrings", "stdlib_code"]] = Field(
        default_factory=lambda: ["stdlib_docstrings", "stdlib_code"], min_length=1)
    max_documents: int = Field(20, ge=1, le=100000, description="Documents per source.")
    max_tokens: int = Field(2048, ge=16, le=10**9, description="Tokens scored per source.")
    seq_length: int = Field(128, ge=8, le=131072, description="Window length; must fit the model's context.")
    # Perplexity by position: a context extension's effect shows beyond the original length (DeepSeek-V3 §4.3).
    position_buckets: list[int] | Literal["quarters"] | None = Field(
        None, description="Also report perplexity per bucket of prediction positions within each window: edges "
        "[0, e1, ..., seq_length] (metrics pos_<a>_<b>, e.g. [0, 64, 256] after a 64 -> 256 extension), or "
        "'quarters' for [0, L/4, L/2, L]. None: off.")
    allow_beyond_max_positions: bool = Field(
        False, description="Score windows longer than the model's max_position_embeddings (RoPE applies at any "
        "position): the un-extended parent's baseline at the extended length.")

    @model_validator(mode="after")
    def _check(self) -> "PerplexitySuite":
        edges = self.position_buckets
        if isinstance(edges, list) and (not edges or edges[0] != 0 or edges != sorted(set(edges))
                                        or edges[-1] > self.seq_length):
            raise ValueError(f"position_buckets {edges} must rise strictly from 0 to at most seq_length "
                             f"({self.seq_length})")
        return self


class EvaluateConfig(StageConfig):
    """Generation and sandboxed code execution need one process on one GPU (under torchrun, so the model builds as
    in training)."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        kind="evaluate", launcher="torchrun", gpus_per_node=1, retries=2, retry_delay_minutes=5, timeout_minutes=4 * 60,
        inputs=(StageInput("checkpoint", upstream="pretrain"),),
        form_fields=(
            "humaneval.enabled", "humaneval.max_problems", "fim.enabled", "fim.num_spans", "passkey.enabled",
            "passkey.context_lengths", "arith.enabled", "arith.num_problems", "perplexity.enabled", "tasks.enabled",
        ))

    checkpoint: str | None = Field(None, description="A release directory, or a registered version: "
                                   "models:/<name>@<alias> or models:/<name>/<version>. Default: the pretrain "
                                   "stage's release checkpoint under run_root.")
    model_version: str | None = Field(None, description="Registered version (models:/<name>/<version> or @alias) to "
                                      "tag with seekflow.eval.* results; default: the checkpoint's, if registered.")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts (or perplexity windows) per forward.")
    humaneval: HumanEvalSuite = Field(default_factory=HumanEvalSuite)
    fim: FimSuite = Field(default_factory=FimSuite)
    passkey: PasskeySuite = Field(default_factory=PasskeySuite)
    arith: ArithSuite = Field(default_factory=ArithSuite)
    perplexity: PerplexitySuite = Field(default_factory=PerplexitySuite)
    tasks: TasksSuite = Field(default_factory=TasksSuite)

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        for ref in (self.checkpoint, self.model_version):
            if ref and ref.startswith("models:/") and not re.fullmatch(r"models:/[^/@]+(/\d+|@[\w-]+)", ref):
                raise ValueError(f"{ref!r} is not models:/<name>/<version> or models:/<name>@<alias>")
        if self.model_version and not self.model_version.startswith("models:/"):
            raise ValueError("model_version must be models:/<name>/<version> or models:/<name>@<alias>")
        return self

