"""Pruning inside the training loop (the compress stage): the `Pruner` callback updates the masks on the schedule,
keeps the pruned weights at zero through every optimizer step, and takes CAP's snapshots.

  - **On the schedule.** Before a step whose scheduled sparsity differs from the current one, the masks are rebuilt
    from the weights (training/train/pruning.py: the pruned weights are zero, so they stay pruned) and applied.
  - **Kept at zero.** The masked gradients are zeroed before megatron reduces them (so clipping and the grad norm
    see none), and the masked elements of what the inner optimizer steps (the fp32 main parameters, or this rank's
    shard of them) are zeroed after every step, before megatron copies them to the model: Adam's moments, weight
    decay or bf16 rounding cannot bring a pruned weight back.
  - **Snapshots.** At each mask update after the first, before the new masks, the model represents every input
    into SnC's bank (training/train/cap.py); each is written to `snapshots/step-<N>.safetensors` under the stage.
  - **Resume.** Nothing extra is checkpointed: the masks of the last update are rebuilt from the resumed weights (the
    zeros rank lowest) and the snapshots taken before the resumed step are read back.
"""
from __future__ import annotations

from pathlib import Path

import torch

from training import storage
from training.config.compress import PruningConfig
from training.train import pruning
from training.train.trainer import Callback


def scheduled_sparsity(cfg: PruningConfig, step: int, total_steps: int) -> float:
    """The sparsity the step with index `step` (0-based) trains at."""
    if cfg.schedule == "stepped":
        return pruning.stepped_sparsity(step, total_steps, cfg.sparsity, cfg.stages)
    at = step - step % cfg.interval   # the cubic value of the last update
    return pruning.cubic_sparsity(at, total_steps, cfg.sparsity, cooldown=cfg.cooldown_steps)


class Pruner(Callback):
    """`module`: the GPT train module (one model chunk: compress refuses pipeline parallelism); `represent()`: the
    current model's representations of every input; `banks`/`loss`: CAP's, or None for pruning alone."""

    def __init__(self, module, cfg: PruningConfig, heads: int, snapshots: Path, represent=None, banks=None,
                 loss=None, is_main: bool = True, writes: bool = True):
        from training.train.child_tuning import optimizer_slots

        self.module, self.cfg, self.heads, self.snapshots = module, cfg, heads, snapshots
        self.represent, self.banks, self.loss = represent, banks, loss
        self.is_main, self.writes = is_main, writes   # writes: this node's first rank (writes the snapshots)
        self.chunk = module.chunks[0]
        self.params = dict(self.chunk.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        names = {id(p): n for n, p in self.params.items()}
        optimizers = list(getattr(module.optimizer, "chained_optimizers", [module.optimizer]))
        self.slots = [slot for sub in optimizers
                      for slot in optimizer_slots(sub, names, {id(p): True for p in self.params.values()})]
        for sub in optimizers:
            if sub.optimizer is not None:
                sub.optimizer.register_step_post_hook(lambda *_: self.zero_stepped())
        module.grad_finalize_hooks.append(self.zero_gradients)

    # -- masks -------------------------------------------------------------------------------------------------------
    def update(self, sparsity: float) -> None:
        """Masks at `sparsity` from the current weights, applied to the model and to the optimizer's copies."""
        self.masks = pruning.model_masks(self.params, self.cfg.structure, sparsity, self.heads,
                                         self.cfg.min_heads_per_layer)
        self.sparsity = sparsity
        pruning.apply_masks(self.params, self.masks)
        self.zero_stepped()

    @torch.no_grad()
    def zero_stepped(self) -> None:
        for slot in self.slots:
            kept = self.masks.get(slot.name)
            if kept is not None:
                slot.inner.mul_(kept.reshape(-1)[slot.start:slot.end].view_as(slot.inner).to(slot.inner.dtype))

    def zero_gradients(self) -> None:
        pruning.apply_masks(self.params, self.masks, gradients=True)

    # -- the loop ----------------------------------------------------------------------------------------------------
    def pre_train(self, trainer) -> None:
        if trainer.step == 0:
            return
        last = scheduled_sparsity(self.cfg, trainer.step - 1, trainer.train.steps)
        self.update(last)   # the resumed weights' zeros are the last update's masks
        if self.banks is not None:
            for step, path in stored_snapshots(storage.uri_of(self.snapshots, trainer.run_root)):
                if step < trainer.step:   # one taken at the resumed step itself is taken again
                    self.banks.snapshot(read_snapshot(path), step)
        if self.is_main:
            print(f"{trainer.label}: pruning resumed at sparsity {last:.3f}"
                  + (f" with {len(self.banks.snapshot_steps)} snapshots" if self.banks else ""), flush=True)

    def pre_step(self, trainer) -> None:
        if self.loss is not None:
            self.loss.at_step(trainer.step)
        target = scheduled_sparsity(self.cfg, trainer.step, trainer.train.steps)
        if target == self.sparsity:
            return
        if self.banks is not None and self.masks:   # SnC: the model as the previous masks left it
            representations = self.represent()
            self.banks.snapshot(representations, trainer.step)
            if self.writes:
                write_snapshot(self.snapshots / f"step-{trainer.step}.safetensors", representations)
        self.update(target)
        if self.is_main:
            print(f"{trainer.label}: step {trainer.step}: pruned to sparsity {target:.3f} "
                  f"({self.prunable_sparsity():.4f} of the decoder's weight matrices are zero)", flush=True)

    def log_metrics(self, trainer) -> dict[str, float]:
        return {"sparsity": self.prunable_sparsity()}

    def prunable_sparsity(self) -> float:
        zeros, total = counts(pruning.prunable(self.params))
        return zeros / max(total, 1)


def counts(params: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(zeros, elements) over `params`, whole-model: the routed experts' are summed over expert-parallel ranks (each
    holds its own experts; every other parameter is the same on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tally = torch.zeros(2, 2, dtype=torch.int64)   # [other, routed experts] x [zeros, elements]
    for name, p in params.items():
        row = 1 if ".experts.local_experts." in name else 0
        tally[row, 0] += int((p == 0).sum())
        tally[row, 1] += p.numel()
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        experts = tally[1].to(next(iter(params.values())).device)
        dist.all_reduce(experts, group=parallel_state.get_expert_model_parallel_group())
        tally[1] = experts.cpu()
    zeros, total = tally.sum(0).tolist()
    return zeros, total


def write_snapshot(path: Path, representations: torch.Tensor) -> None:
    """Written whole or not at all, then uploaded when the run root is remote (a retry on another machine reads it)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"representations": representations.contiguous()}, str(partial))
    partial.replace(path)
    storage.publish(path)


def stored_snapshots(uri: str) -> list[tuple[int, Path]]:
    """(step, local path) of the snapshots written under `uri`, by step."""
    if not storage.exists(uri):
        return []
    found = [(int(Path(file).name[5:-len(".safetensors")]), file) for file, _ in storage.list_files(uri)
             if Path(file).name.startswith("step-") and file.endswith(".safetensors")]
    return [(step, storage.fetch(file)) for step, file in sorted(found)]


def read_snapshot(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file   # no pickle: plain tensors

    return load_file(str(path))["representations"]
