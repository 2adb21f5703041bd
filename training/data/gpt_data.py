"""Pretraining batches from the curate stage's indexed datasets, through megatron-core's own dataset builders.

`BlendedMegatronDatasetBuilder` blends the sources by the weights in the curate manifest and builds (and caches) the
document/sample/shuffle indices; we only cut the resulting sample stream into per-rank micro-batches starting at
`consumed_samples`, so a resumed run sees exactly the batches the interrupted run would have seen.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TokenizerInfo:
    """The few tokenizer facts megatron's GPTDataset needs (it never tokenizes: data is pre-tokenized)."""

    vocab_size: int
    eod: int
    unique_identifiers: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self):
        self.unique_identifiers = OrderedDict(vocab_size=self.vocab_size, eod=self.eod)


def fetch_datasets(curate_manifest: dict) -> None:
    """Download the curated datasets of an s3 run root into the local mirror (local paths: nothing to do)."""
    from training import storage

    for entry in curate_manifest["outputs"]["datasets"]:
        for suffix in (".bin", ".idx"):
            storage.fetch(entry["prefix"] + suffix)


def build_train_dataset(curate_manifest: dict, *, seq_length: int, num_samples: int, seed: int, cache_dir: Path):
    """The blended training dataset, with at least `num_samples` sequences of `seq_length + 1` tokens."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from training import storage

    datasets = curate_manifest["outputs"]["datasets"]
    if not datasets:
        raise ValueError("the curate manifest lists no datasets: nothing to train on")
    tokenizer = curate_manifest["outputs"]["tokenizer"]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(storage.local_dir(d["prefix"], create=False)) for d in datasets],
               [float(d["weight"]) for d in datasets]),
        split="100,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=TokenizerInfo(vocab_size=tokenizer["vocab_size"], eod=tokenizer["eod_id"]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,   # causal masking happens inside attention
        mid_level_dataset_surplus=0.005,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


class MicroBatches:
    """Yields this data-parallel rank's micro-batches, in global-batch order, from `consumed_samples` on."""

    def __init__(self, dataset, *, micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # Each global step of dp_size micro-batches takes consecutive samples; rank r takes the r-th slice.
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        indices = [(start + i) % len(self.dataset) for i in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        samples = [self.dataset[i] for i in indices]
        # The next-token keys, plus any a loss reads that the dataset declares (GRPO's old_logp, advantages...): [S]
        # per sample, so context parallelism can split them. Other keys (a BlendedDataset's dataset_id) stay behind.
        keys = ("tokens", "labels", "loss_mask", "position_ids", *getattr(self.dataset, "extra_keys", ()))
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}


class BatchRamp:
    """The global batch size of each step, and the samples consumed after n steps.

    With a ramp, megatron-core's RampupBatchsizeNumMicroBatchesCalculator decides the size from the samples consumed
    so far (a pure function of the data position, so a resumed run continues the ramp where it stopped); without
    one, every step takes global_batch_size. `samples_after` is what token-scheduled learning rates read."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, dp_size: int,
                 rampup: tuple[int, int, int] | None = None):
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

        self.global_batch_size, self.per_step = global_batch_size, micro_batch_size * dp_size
        sizes = {"train.global_batch_size": global_batch_size}
        if rampup is not None:
            sizes.update({"train.batch_size_rampup.start_batch_size": rampup[0],
                          "train.batch_size_rampup.batch_size_increment": rampup[1]})
        for name, size in sizes.items():
            if size % self.per_step:
                raise ValueError(f"{name} ({size}) must be a multiple of micro_batch_size x data-parallel size "
                                 f"({self.per_step})")
        self.calculator = None
        if rampup is not None:
            start, increment, samples = rampup
            self.calculator = RampupBatchsizeNumMicroBatchesCalculator(
                global_batch_size, micro_batch_size, dp_size, decrease_batch_size_if_needed=False, rank=1,
                start_global_batch_size=start, batch_size_increment=increment, ramup_samples=samples)
        self._after = [0]   # samples consumed after i steps, while the ramp lasts

    def batch_size(self, consumed_samples: int) -> int:
        if self.calculator is None:
            return self.global_batch_size
        self.calculator.update(consumed_samples, consistency_check=True)
        return self.calculator.get_current_global_batch_size()

    def num_microbatches(self, consumed_samples: int) -> int:
        """Micro-batches each data-parallel rank runs in the step that starts at `consumed_samples`."""
        return self.batch_size(consumed_samples) // self.per_step

    def samples_after(self, steps: int) -> int:
        while len(self._after) <= steps:
            size = self.batch_size(self._after[-1])
            if size == self.global_batch_size:   # the ramp is over: every later step is a full batch
                break
            self._after.append(self._after[-1] + size)
        done = min(steps, len(self._after) - 1)
        return self._after[done] + (steps - done) * self.global_batch_size
