"""The compress stage's config: contrastive pruning (CAP; Xu et al., "From Dense to Sparse: Contrastive Pruning for
Better Pre-trained Language Model Compression", AAAI 2022) of a fine-tuned model, on the task suite it was tuned for.

The model is pruned to `pruning.sparsity` on a schedule while it keeps training on the task's loss, plus CAP's three
contrastive terms on sequence representations (`contrastive`): against the pre-trained model (PrC), the fine-tuned
model (FiC) and the model's own earlier pruning snapshots (SnC). training/stages/compress.py runs it.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import Section, StageInput, StageSpec
from training.config.pretrain import TrainingConfig
from training.config.tasks import TaskSuiteConfig
from training.config.train import OptimizerConfig


class PruningConfig(Section):
    """What is pruned, how far, and on which schedule (training/train/pruning.py)."""

    structure: Literal["unstructured", "structured"] = Field(
        "unstructured", description="unstructured: the lowest-magnitude elements of every decoder weight matrix "
        "(attention projections, dense FFN, shared and routed experts); structured: whole FFN neurons (dense, shared "
        "and every routed expert's) and whole attention heads (an MLA head's query, key and value rows and its "
        "output-projection columns). Embeddings, the output head, norms, routers and the MTP module are never pruned.")
    sparsity: float = Field(0.9, gt=0, lt=1, description="The final share of the prunable weights that are zero (CAP "
                                                         "reports 90% and above for unstructured pruning).")
    schedule: Literal["stepped", "cubic"] = Field(
        "stepped", description="stepped: `stages` equal steps up to `sparsity`, each held for an equal share of "
        "train.steps (CAP's PRUNE_SEQUENCE 10, 20, ..., 90); cubic: Zhu and Gupta's s_t = s_f (1 - (1 - t/T)^3), "
        "updated every `interval` steps, reaching `sparsity` `cooldown_steps` before the end.")
    stages: int = Field(9, ge=1, le=100, description="stepped: how many pruning steps (CAP: 9, to 90%).")
    interval: int = Field(10, ge=1, description="cubic: steps between mask updates.")
    cooldown_steps: int = Field(0, ge=0, description="cubic: steps trained at the final sparsity at the end.")
    min_heads_per_layer: int = Field(1, ge=1, description="structured: attention heads every layer keeps (the "
                                                          "authors' at_least_x_heads_per_layer).")


class ContrastiveConfig(Section):
    """CAP's contrastive terms (training/train/contrastive.py). Each term is `unsupervised_weight` x (positives: the
    same input) + `supervised_weight` x (positives: inputs of the same task), scaled by its own weight; 0 turns a
    term off (its ablation)."""

    # CAP sums the three terms unweighted (the authors' PruneBert.forward adds each once).
    prc_weight: float = Field(1.0, ge=0, description="PrC: against the pre-trained model's representations.")
    fic_weight: float = Field(1.0, ge=0, description="FiC: against the fine-tuned model's representations.")
    snc_weight: float = Field(1.0, ge=0, description="SnC: against the snapshots taken at earlier mask updates.")
    # The authors' run scripts (github.com/RunxinXu/ContrastivePruning, StructuredPruning/run_glue.sh): τ 0.1,
    # unsupervised 0.3 and supervised 3, 4,096 extra examples.
    temperature: float = Field(0.1, gt=0, description="τ of the scores exp(z·z'/τ).")
    unsupervised_weight: float = Field(0.3, ge=0, description="Weight of each term's same-input loss.")
    supervised_weight: float = Field(3.0, ge=0, description="Weight of each term's same-task loss.")
    extra_examples: int = Field(4096, ge=0, description="Other inputs' representations drawn from each bank as "
                                                        "candidates (split over the bank's representations per input).")
    max_snapshots: int = Field(8, ge=1, description="Snapshots SnC keeps, the most recent (CAP's nine steps: 8).")


class CompressConfig(TrainingConfig):
    """Under torchrun: the fine-tuned model (`fine_tuned`) is pruned while it trains on the task suite's train split;
    the pre-trained model (`pretrained`) and the fine-tuned one are read once, to represent every training input."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # As sft: a retry resumes from the last complete checkpoint (its masks are rebuilt from the zero weights).
        kind="compress", launcher="torchrun", retries=3, retry_delay_minutes=5, timeout_minutes=24 * 60,
        inputs=(StageInput("fine_tuned", upstream="sft"), StageInput("pretrained", upstream="pretrain")),
        form_fields=(
            "pruning.structure", "pruning.sparsity", "pruning.schedule", "pruning.stages",
            "contrastive.prc_weight", "contrastive.fic_weight", "contrastive.snc_weight",
            "tasks.tasks", "tasks.train_items", "epochs",
            "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
        ))

    fine_tuned: str | None = Field(
        None, min_length=1, description="The model to compress: a release directory, an s3:// URI or a registered "
        "version (models:/seekflow-<profile>@champion, models:/name/version). Default: the sft stage's release "
        "under run_root (or the instance `reads.sft` names). `model` must be its architecture.")
    pretrained: str | None = Field(
        None, min_length=1, description="Its pre-trained parent, the model PrC contrasts with (a reference as "
        "above). Default: the pretrain stage's release under run_root (or the instance `reads.pretrain` names).")
    start: Literal["fine_tuned", "pretrained"] = Field(
        "fine_tuned", description="The weights pruning starts from: the fine-tuned model (compress what is "
        "deployed), or the pre-trained one, fine-tuned while it is pruned (the authors' structured runs).")
    tasks: TaskSuiteConfig = Field(default_factory=TaskSuiteConfig,
                                   description="The training inputs: the task suite's train split, generated; an "
                                               "input's task is its label for the supervised terms.")
    epochs: float | None = Field(
        2.0, gt=0, description="Passes over the inputs (one per sequence); sets train.steps (CAP re-trains two "
                               "epochs after each pruning step: RETRAIN_EPOCH=2.0). None: train.steps as given.")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    ce_weight: float = Field(1.0, ge=0, description="Weight of the task loss (next-token cross-entropy on the "
                                                    "replies). The authors' 0.1 sits beside a 0.9 distillation "
                                                    "loss, which this stage does not have.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(decay_style="linear", lr=2e-5, min_lr=0.0, warmup_steps=0),
        description="CAP's run scripts: lr 2e-5, linear decay (HF Trainer's default) after a 10% warm-up.")
    max_reject_ratio: float = Field(0.1, ge=0, le=1, description="Fail when more than this share of the inputs is "
                                                                "longer than a sequence (each is set aside).")

    @model_validator(mode="after")
    def _check_layout(self) -> "CompressConfig":
        par = self.parallel
        for field in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(par, field) > 1:
                raise ValueError(f"parallel.{field} must be 1 for compress: a weight matrix is pruned whole on one "
                                 f"rank, and an input's representation is pooled over its whole sequence on the last "
                                 f"stage (data and expert parallelism are supported)")
        return self
