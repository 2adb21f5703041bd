"""What the Trainer trains: the train module interface (in the manner of OLMo-core's TrainModule).

The Trainer (training/train/trainer.py) owns the loop: steps, the checkpoint cadence, resume, metrics, progress lines,
MLflow and callbacks. A train module owns everything about *what* is trained: the model build and its parallel
wrapping, the optimizer and lr scheduler, the batches, and the loss of a batch. `GPTTrainModule` is the megatron-core
one; a stage that trains (pretrain, code CPT, SFT, distillation, GRPO's policy update) gives it only its data and its
`Loss`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class Loss(ABC):
    """A per-micro-batch loss in megatron-core's forward-step contract.

    Called with a model chunk and one micro-batch (on the device and, under context parallelism, already this rank's
    share of the sequence), it runs the forward pass and returns `(output, loss_func)`. On the last pipeline stage
    megatron calls `loss_func(output)`, which returns (loss summed over tokens, token count, {name: [sum, count]} for
    each name in `reported`); the first reported name is the loss the progress line shows (spaces become `_`)."""

    reported: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, model, batch: dict):
        ...


class TrainModule(ABC):
    """The model, optimizer, scheduler, batches and loss of one training run (see the module docstring).

    Attributes the Trainer reads: `model` (what checkpoints save: one module, or the list of virtual-pipeline
    chunks), `optimizer` and `scheduler` (megatron-core's, checkpointed with it), `architecture` (the ModelConfig
    recorded with every checkpoint and release), `loss_name` (the train_step metric the progress line shows),
    `progress_fields` ((metric, label) pairs the progress line adds when present) and `flops_per_token` (for MFU)."""

    model = None
    optimizer = None
    scheduler = None
    architecture = None
    loss_name: str = "lm_loss"
    progress_fields: tuple[tuple[str, str], ...] = ()
    flops_per_token: float = float("nan")

    @abstractmethod
    def start(self, step: int, consumed_samples: int) -> list[str]:
        """Open the batches at the data position (after a resume, or 0). Returns warnings for the log."""

    def callbacks(self) -> list:
        """Callbacks the module's own options need (the FP8 shadow monitor); the Trainer runs them after the
        stage's."""
        return []

    @property
    @abstractmethod
    def consumed_samples(self) -> int:
        """Sequences consumed so far over every data-parallel rank: the data position checkpoints record."""

    @abstractmethod
    def train_step(self) -> dict:
        """One optimizer step. Returns its metrics, reduced over every rank: at least `loss_name`, `grad_norm`, `lr`
        and `batch_size` (sequences in the step)."""

    @abstractmethod
    def initialise_from(self, release: Path, ref: str) -> None:
        """Start from a release's weights instead of the random init (the optimizer state starts fresh)."""
