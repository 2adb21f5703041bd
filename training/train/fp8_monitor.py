"""The FP8-vs-BF16 shadow monitor (`train.precision: fp8`, `train.fp8_shadow_interval`): is FP8 still tracking the
higher-precision model it stands in for?

Every `interval` steps, after the step, one micro-batch (this rank's first of the run, the same every time) is
recomputed twice with the same weights, without gradients, in eval mode (megatron's routers then count nothing: no
expert-bias update or load metric sees it):
  - in FP8, recording for every FP8 linear the relative Frobenius error of its GEMM output against the same GEMM in
    the training precision (`fp8/quant_error/<layer>`: a layer whose quantisation goes bad stands out);
  - in the training precision alone (BF16: what `train.precision: bf16` computes).
The relative gap of the two losses is logged as `fp8/shadow_loss_gap`, and a warning names the step when it exceeds
`train.fp8_shadow_threshold` (DeepSeek-V3 §3.3: its FP8 training stays within 0.25% of BF16). The recomputation
changes no state, so a run with the monitor trains, and resumes, exactly as one without.

The micro-batch runs through the whole model in one forward, so the monitor needs one pipeline stage and neither
tensor nor context parallelism (it says so, naming the field); under expert parallelism every rank recomputes its own
micro-batch together (the forwards exchange tokens), and rank 0's numbers are logged.
"""
from __future__ import annotations

import torch

from training.train.trainer import Callback


class Fp8ShadowMonitor(Callback):
    def __init__(self, interval: int, threshold: float):
        self.interval, self.threshold = interval, threshold
        self.batch, self.latest = None, {}

    def pre_train(self, trainer) -> None:
        parallel = trainer.module.cfg.parallel
        for name in ("pipeline_model_parallel_size", "tensor_model_parallel_size", "context_parallel_size"):
            if getattr(parallel, name) > 1:
                raise ValueError(f"train.fp8_shadow_interval: the FP8 shadow monitor recomputes a micro-batch in one "
                                 f"forward of the whole model; parallel.{name} is {getattr(parallel, name)} (set "
                                 f"train.fp8_shadow_interval to null, or use 1)")

    def post_step(self, trainer, metrics: dict) -> None:
        if trainer.step % self.interval:
            return
        from training.model.fp8_spec import gemm_mode

        if self.batch is None:   # at the first measurement: GRPO's batches exist only once it has drawn a rollout
            self.batch = trainer.module.probe_batch()
        gpt = trainer.module.chunks[0]
        with gemm_mode("measure") as errors:
            fp8 = self._loss(gpt, trainer.module)
            errors = dict(errors)
        with gemm_mode("high"):
            high = self._loss(gpt, trainer.module)
        gap = (fp8 - high) / high
        self.latest = {"fp8/shadow_loss_gap": gap, "fp8/shadow_loss": fp8, "fp8/shadow_loss_high_precision": high,
                       **{f"fp8/quant_error/{name}": error for name, error in errors.items()}}
        if trainer.is_main:
            worst = max(errors, key=errors.get)
            line = (f"{trainer.label}: step {trainer.step}: FP8 shadow loss gap {100 * gap:+.3f}% ({fp8:.5f} in FP8, "
                    f"{high:.5f} in the training precision); largest GEMM error {errors[worst]:.4f} in {worst}")
            if abs(gap) > self.threshold:
                line = (f"WARNING {line}: over train.fp8_shadow_threshold ({100 * self.threshold:.2f}%)")
            print(line, flush=True)

    def log_metrics(self, trainer) -> dict[str, float]:
        """The last measurement, once (at the first log step from it)."""
        latest, self.latest = self.latest, {}
        return latest

    def _loss(self, gpt, module) -> float:
        """The mean next-token loss of the probe micro-batch (its loss mask), as the model is now."""
        batch = module.vocabulary.batch_to_rows({k: v.to(module.device) for k, v in self.batch.items()})
        was_training = gpt.training
        gpt.eval()
        try:
            with torch.no_grad():
                losses = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        finally:
            gpt.train(was_training)
        mask = batch["loss_mask"].float()
        return float((losses.float() * mask).sum() / mask.sum().clamp_min(1))
