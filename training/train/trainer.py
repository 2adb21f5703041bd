"""The training loop, for every stage that trains (in the manner of OLMo-core's Trainer).

The Trainer owns: the steps, the checkpoint cadence (every `save_interval` steps and at the last, `keep_last` kept,
optionally written in the background), resume from the newest complete checkpoint (training/checkpoint.py keeps the
`latest` and `complete.json` markers), metric windows and progress lines (`<label>: step N/M loss ... ETA ...s`),
MLflow metrics on rank 0, the model-only release checkpoint at the end, and callbacks. What is trained — model,
optimizer, scheduler, batches, loss — belongs to a train module (training/train/module.py).

Callbacks hook in at explicit points; every hook runs on every rank (a hook may take part in a collective).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from training import checkpoint, storage
from training.train.module import TrainModule


class Callback:
    """Hooks into the loop. Every method is a no-op; override the ones you need."""

    def pre_train(self, trainer: Trainer) -> None:
        """After resume and before the first step."""

    def pre_step(self, trainer: Trainer) -> None:
        """Before each step (the data position is the step's first sample)."""

    def post_step(self, trainer: Trainer, metrics: dict) -> None:
        """After each step, with its metrics (`trainer.step` already counts it)."""

    def log_metrics(self, trainer: Trainer) -> dict[str, float]:
        """At each log step: metrics to add to the window's (logged to MLflow by rank 0)."""
        return {}

    def post_checkpoint_saved(self, trainer: Trainer, path: Path) -> None:
        """Once a checkpoint is complete and marked latest (for a background save: when its writers finished)."""

    def post_train(self, trainer: Trainer) -> None:
        """After the last step and every save, before the release checkpoint."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        """When the loop fails; the error is raised again afterwards."""


@dataclass(frozen=True)
class InitialWeights:
    """Weights to start from when there is no checkpoint to resume: `fetch()` returns the local release directory
    (every rank calls it), `ref` names it in the log."""

    ref: str
    fetch: Callable[[], Path]


class Trainer:
    def __init__(self, module: TrainModule, train, info, *, label: str, directory: Path, run_root: str,
                 callbacks: Sequence[Callback] = (), init_weights: InitialWeights | None = None):
        """`train`: the loop settings (TrainLoopConfig); `info`: this rank (DistInfo); `directory`: the stage's
        local directory (checkpoints/ and release/ go under it); `label`: what progress lines start with."""
        self.module, self.train, self.info, self.label = module, train, info, label
        self.directory, self.run_root = directory, run_root
        self.callbacks, self.init_weights = [*callbacks, *module.callbacks()], init_weights
        self.is_main = info.is_main
        self.step, self.mlflow_run = 0, None
        self.ckpt_root = directory / "checkpoints"
        self.ckpt_root.mkdir(exist_ok=True)
        self.ckpt_remote = storage.uri_of(self.ckpt_root, run_root) if storage.is_remote(run_root) else None
        self.async_queue = None
        if train.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"{self.label}: {message}", flush=True)

    def _hooks(self, name: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    # -- the run -----------------------------------------------------------------------------------------------------
    def fit(self, mlflow_run=None) -> dict:
        """Resume (or start from `init_weights`), train to `train.steps`, save the release checkpoint. Returns
        final_loss (the last window's), steps, steps_this_run and tokens."""
        self.mlflow_run = mlflow_run
        try:
            first_step = self.prepare()
            logged = self.run_loop()
            if self.async_queue:
                self.async_queue.maybe_finalize_async_calls(blocking=True)
                self.async_queue.close()
            self._hooks("post_train")
            self.save_release()
        except BaseException as error:
            self._hooks("on_error", error)
            raise
        return {"final_loss": logged.get(self.module.loss_name, math.nan), "steps": self.step,
                "steps_this_run": self.step - first_step, "tokens": self.tokens}

    @property
    def tokens(self) -> int:
        return self.module.consumed_samples * self.train.seq_length

    def prepare(self) -> int:
        """Resume (or start fresh), then the callbacks' pre_train. Returns the step training starts at."""
        step = self.resume()
        self._hooks("pre_train")
        return step

    def resume(self) -> int:
        """Load the newest complete checkpoint (model, optimizer, scheduler, RNG, data position), or start fresh
        (from `init_weights` if given); then open the module's batches. Returns the step training starts at."""
        module = self.module
        resumed = checkpoint.load(self.ckpt_root, module.model, module.optimizer, module.scheduler,
                                  remote=self.ckpt_remote, model_config=module.architecture)
        if not resumed and self.init_weights:
            module.initialise_from(self.init_weights.fetch(), self.init_weights.ref)
            self._say(f"initialised the weights from {self.init_weights.ref}")
        self.step = resumed["step"] if resumed else 0
        consumed = resumed["consumed_samples"] if resumed else 0
        if resumed:
            self._say(f"resumed from step {self.step} ({consumed} samples consumed)")
        for warning in module.start(self.step, consumed):
            self._say(f"warning: {warning}")
        return self.step

    def run_loop(self) -> dict:
        """Steps to `train.steps`; every `log_interval` steps (and the last) print progress and log window-averaged
        metrics; checkpoints every `save_interval` steps (and the last). Returns the last window's metrics."""
        train, loss_name = self.train, self.module.loss_name
        window, window_start, logged = [], time.time(), {}
        devices = dist.get_world_size() if dist.is_initialized() else 1
        while self.step < train.steps:
            self._hooks("pre_step")
            metrics = self.module.train_step()
            self.step += 1
            if not math.isfinite(metrics[loss_name]):
                raise FloatingPointError(f"loss is {metrics[loss_name]} at step {self.step}; stopping")
            self._hooks("post_step", metrics)
            window.append(metrics)
            if self.step % train.log_interval == 0 or self.step == train.steps:
                steps_per_s = len(window) / max(time.time() - window_start, 1e-9)
                logged = {key: sum(m.get(key, math.nan) for m in window) / len(window) for key in window[-1]}
                tokens_per_step = sum(m["batch_size"] * m.get("sequence_length", train.seq_length)
                                      for m in window) / len(window)
                logged.update(lr=metrics["lr"], batch_size=metrics["batch_size"], steps_per_s=steps_per_s,
                              tokens_per_s=steps_per_s * tokens_per_step)
                logged.update(self._throughput(logged["tokens_per_s"], devices))
                for callback in self.callbacks:   # every rank: a callback's metrics may need a collective
                    logged.update(callback.log_metrics(self))
                if self.is_main:
                    self._report(logged, steps_per_s)
                window, window_start = [], time.time()
            if self.async_queue:   # a collective: completes a background save once every rank's writer is done
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            if self.step % train.save_interval == 0 or self.step == train.steps:
                self.save()
        return logged

    # -- metrics -----------------------------------------------------------------------------------------------------
    def _throughput(self, tokens_per_s: float, devices: int) -> dict:
        from training.metrics import mfu

        flops = self.module.flops_per_token
        out = {"tokens": float(self.tokens), "model_tflops_per_s": tokens_per_s * flops / 1e12}
        utilisation = mfu(tokens_per_s, flops, self.train.peak_flops_per_device, devices)
        if math.isfinite(utilisation):
            out["mfu"] = utilisation
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return out

    def _report(self, logged: dict, steps_per_s: float) -> None:
        steps = self.train.steps
        eta = (steps - self.step) / steps_per_s
        extras = "".join(f"{label} {logged[key]:.4f} " for key, label in self.module.progress_fields if key in logged)
        print(f"{self.label}: step {self.step}/{steps} loss {logged[self.module.loss_name]:.4f} "
              f"{extras}lr {logged['lr']:.2e} gnorm {logged['grad_norm']:.3f} "
              f"{steps_per_s:.2f} steps/s {logged['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s", flush=True)
        if self.mlflow_run:
            import mlflow

            mlflow.log_metrics({k: v for k, v in logged.items() if math.isfinite(v)}, step=self.step)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def save(self) -> None:
        """A full checkpoint of this step (in the background with train.async_save)."""
        if self.async_queue:   # one background save at a time: the previous one must be complete first
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        started = time.time()
        common = {"step": self.step, "consumed_samples": self.module.consumed_samples,
                  checkpoint.MODEL_CONFIG: self.module.architecture.model_dump(mode="json")}
        target = checkpoint.step_dir(self.ckpt_root, self.step)
        path = checkpoint.save(self.ckpt_root, self.step, self.module.model, self.module.optimizer,
                               self.module.scheduler, common, keep_last=self.train.keep_last, remote=self.ckpt_remote,
                               async_queue=self.async_queue,
                               on_complete=lambda: self._hooks("post_checkpoint_saved", target))
        how = "started a background save of" if self.async_queue else "saved"
        self._say(f"{how} {path.name} in {time.time() - started:.1f}s")

    def save_release(self) -> Path:
        """Model weights only, plus the architecture that reads them and the complete marker (every file's sha256):
        what register and evaluate take."""
        release_dir = self.directory / "release"
        if self.is_main:   # a remote release from an earlier run must not keep files this layout won't write
            storage.delete(storage.uri_of(release_dir, self.run_root))
        release = checkpoint.save_release(release_dir, self.module.model, self.module.architecture)
        if self.info.local_rank == 0:   # s3 run roots: upload (each node its ranks' files); local: nothing to do
            storage.publish(release, exclude=(checkpoint.COMPLETE,))
        dist.barrier()
        if self.is_main:   # the marker last: a reader never sees it before every file it lists
            storage.publish(release / checkpoint.COMPLETE)
        dist.barrier()
        self._say(f"release checkpoint at {storage.uri_of(release, self.run_root)}")
        return release
