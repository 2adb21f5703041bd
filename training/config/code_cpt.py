"""The code_cpt stage's config: continued pretraining of a released model on a code-heavy mixture with
fill-in-the-middle (DeepSeek-Coder-V2, arXiv:2406.11931).

It is the pretrain config (model, parallel layout, optimizer, loop) plus what continued pretraining needs: the model to
continue from, the mixture weights over the curated sources, and the FIM rate its code must carry. FIM itself happens
at packing time in curation (`CurateSource.fim`, training/data/fim.py), so `fim_rate` here is a requirement checked
against the curate manifest, not a transform.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from training.config.base import Section, StageInput, StageSpec
from training.config.pretrain import PretrainConfig


class KssmConfig(Section):
    """KSSM's two objectives (Wang et al., "Knowledgeable Salient Span Mask for Enhancing Language Models as
    Knowledge Base"), adapted to a causal model (training/train/kssm.py). The paper gives no weights for a causal
    LM; these defaults are seekflow's."""

    span_weight: float = Field(1.0, ge=0, description="Extra weight of a knowledge-bearing label's cross-entropy "
                                                      "(1 + span_weight times a plain token's).")
    attention_weight: float = Field(0.1, ge=0, description="Weight of the attention objective: -log of the attention "
                                                           "mass that positions predicting a K-B token put on earlier "
                                                           "K-B tokens, every layer. 0: off.")
    model_fraction: float = Field(0.1, ge=0, le=1, description="Besides the rules' spans, the share of word tokens "
                                                               "the model mispredicts most in each sequence that "
                                                               "count as K-B (the paper's signal). 0: rules only.")


class CodeCptConfig(PretrainConfig):
    """Continued pretraining under torchrun from a model release, on a curated mixture whose code carries FIM."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # As pretrain: long, and a retry resumes from the last complete checkpoint.
        kind="code_cpt", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=3 * 24 * 60,
        inputs=(StageInput("data_manifest", upstream="curate"), StageInput("init_checkpoint", upstream="pretrain")),
        form_fields=(
            "mixture", "fim_rate", "kssm",
            "train.steps", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "train.log_interval", "train.save_interval",
            "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.decay_style",
        ))

    data_manifest: str | None = Field(
        None, description="Curate manifest of the mixture; default {run_root}/curate (or the instance `reads.curate` "
                          "names, e.g. a `curate_code` instance whose code source has fim.rate 0.5).")
    init_checkpoint: str | None = Field(
        None, min_length=1, description="The model to continue from: a release directory, an s3:// URI or a "
        "registered version (models:/seekflow-<profile>@champion, models:/name/version). Default: the pretrain "
        "stage's release under run_root (or the instance `reads.pretrain` names). `model` must be its architecture. "
        "The optimizer, schedule and data start fresh; a rerun that resumes this stage's own checkpoint keeps the "
        "parent it started from.")
    mixture: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Blend weights by curated source name (the manifest's datasets[].name), e.g. "
                          "{package_code: 0.6, package_metadata: 0.3}; megatron-core normalises them, sources left out "
                          "are not trained on. DeepSeek-Coder-V2 §2: 60% code, 10% math, 30% natural language. "
                          "Default: the curate manifest's weights.")
    fim_rate: float | None = Field(
        0.5, ge=0, le=1, description="The FIM rate the mixture's code sources must have been curated with "
                                     "(curate sources[].fim.rate), checked before training. DeepSeek-Coder-V2 §3.1: "
                                     "0.5, PSM, for the 16B (Lite) model; 0 for the 236B (next-token prediction "
                                     "only). null: any rate.")
    kssm: KssmConfig | None = Field(
        None, description="Knowledge CPT: train with KSSM's objectives (training/train/kssm.py) instead of the plain "
                          "next-token loss. null: plain continued pretraining.")

    @model_validator(mode="after")
    def _check_kssm(self) -> "CodeCptConfig":
        if self.kssm is None:
            return self
        if self.parallel.context_parallel_size > 1:
            raise ValueError("kssm: K-B spans are found on each sequence's text, which context parallelism splits "
                             "over ranks; set parallel.context_parallel_size 1")
        if self.kssm.attention_weight > 0 and self.parallel.pipeline_model_parallel_size > 1:
            raise ValueError("kssm.attention_weight: the attention objective is collected from every layer into the "
                             "loss of the last pipeline stage; with parallel.pipeline_model_parallel_size > 1 set "
                             "it to 0")
        if self.kssm.attention_weight > 0 and self.parallel.tensor_model_parallel_size > 1:
            raise ValueError("kssm.attention_weight: each tensor-parallel rank holds only its heads' attention, so "
                             "the ranks' objectives would differ; with parallel.tensor_model_parallel_size > 1 set "
                             "it to 0")
        return self
