"""The megatron-core GPT train module: a DeepSeek-shaped GPTModel, parallel-wrapped, with megatron's optimizer and lr
scheduler, fed by a stage's dataset and trained on a stage's `Loss`.

Pretraining is one use of it; any stage that trains this model supplies `dataset(num_samples)` (an indexable dataset
of {tokens, labels, loss_mask, position_ids} samples) and a `Loss`, and gets: virtual-pipeline chunks, DDP (with the
distributed optimizer if configured), bf16 mixed precision, the batch-size ramp, token-scheduled learning rates and
megatron's forward/backward schedules for any layout.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from training.config import ModelConfig
from training.config.child_tuning import ChildTuningConfig
from training.train import losses, schedules
from training.train.module import Loss, TrainModule
from training.vocabulary import vocabulary


class GPTTrainModule(TrainModule):
    """`cfg` is a training stage config: `model`, `parallel`, `optimizer`, `train` and `seed` sections. `frozen`:
    which parameters (by name) stay as loaded."""

    progress_fields = (("mtp_loss", "mtp"),)   # a model without MTP logs none

    def __init__(self, cfg, device: torch.device, *, dataset: Callable[[int], object], loss: Loss,
                 child_tuning: ChildTuningConfig | None = None, frozen: Callable[[str], bool] | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from training.data.gpt_data import BatchRamp
        from training.metrics import flops_per_token
        from training.model.build import build_gpt

        if not distrib_optimizer.HAVE_APEX_OR_TE:
            cfg.check_checkpointable_without_fused_adam()
        self.cfg, self.device, self.dataset_of, self.loss = cfg, device, dataset, loss
        self.vocabulary = vocabulary(cfg.model.vocab_merges)
        self.architecture, self.loss_name = cfg.model, loss.reported[0].replace(" ", "_")
        train, opt = cfg.train, cfg.optimizer
        self.dp_size = parallel_state.get_data_parallel_world_size()
        ramp = train.batch_size_rampup   # megatron counts the ramp in samples
        self.ramp = BatchRamp(train.global_batch_size, train.micro_batch_size, self.dp_size, rampup=ramp and (
            ramp.start_batch_size, ramp.batch_size_increment, int(ramp.ramp_tokens // train.seq_length)))

        # With a virtual pipeline, each rank holds `vpp` model chunks (megatron's interleaved 1F1B schedule).
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        bf16 = train.precision in ("bf16", "fp8")   # fp8: bf16 mixed precision with the linears' GEMMs in FP8
        built = [build_gpt(cfg.model, cfg.parallel, seed=cfg.seed, vp_stage=v, bf16=bf16, fp8=train.precision == "fp8")
                 for v in (range(vpp) if vpp else [None])]
        self.chunks, self.tconfigs = [gpt for gpt, _ in built], [config for _, config in built]
        for gpt in self.chunks:   # built (and seeded) on the CPU; trained on this rank's device
            gpt.to(device)
            for name, param in gpt.named_parameters():   # `frozen` ones get no gradient, optimizer state or update:
                if frozen and frozen(name):               # megatron's DDP and optimizer skip requires_grad=False
                    param.requires_grad_(False)
        self.model = self.chunks if vpp else self.chunks[0]   # what checkpoints save: one model, or the chunks
        # bf16: megatron's mixed precision. Float16Module casts the weights (and first-stage inputs) to bf16 and the
        # outputs back to fp32; gradients are reduced in fp32 and the optimizer steps fp32 master weights.
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                                   grad_reduce_in_fp32=bf16)
        self.wrapped = [DistributedDataParallel(config, ddp_config, Float16Module(config, gpt) if bf16 else gpt)
                        for gpt, config in built]
        if vpp and self.ramp.num_microbatches(0) < cfg.parallel.pipeline_model_parallel_size:
            raise ValueError(f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size) needs at "
                             f"least pipeline_model_parallel_size micro-batches per step; the first step has "
                             f"{self.ramp.num_microbatches(0)} (train.global_batch_size or batch_size_rampup."
                             f"start_batch_size / micro_batch_size / data-parallel size)")

        self.grad_finalize_hooks: list[Callable[[], None]] = []   # run first thing in finalize_model_grads
        if train.precision == "fp8" and device.type == "cuda":   # FP8's inf/NaN checks: once a step, before the
            from training.model import fp8_quant                  # optimizer step (fp8_quant.defer_finite_checks)

            fp8_quant.defer_finite_checks(True)
            self.grad_finalize_hooks.append(fp8_quant.check_deferred)

        def finalize(*args, **kwargs):
            for hook in self.grad_finalize_hooks:
                hook()
            return finalize_model_grads(*args, **kwargs)

        tconfig = self.tconfigs[0]   # the schedule and finalize_model_grads read the first chunk's
        tconfig.finalize_model_grads_func = finalize   # also updates the expert-bias (aux-loss-free)
        tconfig.no_sync_func = [m.no_sync for m in self.wrapped] if vpp else self.wrapped[0].no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
        ), self.wrapped)
        scheduler_cls = OptimizerParamScheduler
        if opt.decay_style in schedules.TOKEN_SCHEDULED:
            scheduler_cls = schedules.token_scheduler_class(
                OptimizerParamScheduler, schedules.lr_function(opt, train, self.ramp.samples_after))
        self.scheduler = scheduler_cls(
            self.optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=train.steps,
            lr_decay_style=opt.decay_style if scheduler_cls is OptimizerParamScheduler else "constant",
            start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant")
        self.flops_per_token = flops_per_token(cfg.model, train.seq_length)
        self.seq_length = train.seq_length   # the micro-batches' length (GRPO trains each rollout at its own width)
        self.chunk_batches = None
        # Child-Tuning (training/train/child_tuning.py), a fine-tuning option: hooks on the optimizer that update
        # only a child network of the parameter elements. None when not configured.
        self.child_tuning = None
        if child_tuning is not None and child_tuning.mode != "off":
            from training.train.child_tuning import ChildTuning

            self.child_tuning = ChildTuning(child_tuning, self.optimizer, self.chunks, seed=cfg.seed)

    # -- data --------------------------------------------------------------------------------------------------------
    def start(self, step: int, consumed_samples: int) -> list[str]:
        from megatron.core import parallel_state

        from training.data.gpt_data import MicroBatches

        train = self.cfg.train
        dataset = self.dataset_of(self.ramp.samples_after(train.steps))
        self.dataset = dataset
        # One reader per model chunk, in step: each chunk's forward reads the micro-batch it is at.
        self.chunk_batches = [MicroBatches(dataset, micro_batch_size=train.micro_batch_size,
                                           dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp_size,
                                           consumed_samples=consumed_samples) for _ in self.wrapped]
        if step and consumed_samples != self.ramp.samples_after(step):   # the batch sizes changed since the save
            return [f"{self.ramp.samples_after(step)} samples would be consumed after {step} steps with this batch "
                    f"size (ramp); a token-scheduled lr follows the step count, the data position (and γ, λ) the "
                    f"checkpoint's {consumed_samples} samples"]
        return []

    @property
    def batches(self):
        return self.chunk_batches[0]

    def probe_batch(self) -> dict:
        """This rank's first micro-batch of the run (on the CPU, in DeepSeek ids), whatever the data position."""
        from megatron.core import parallel_state

        from training.data.gpt_data import MicroBatches

        return next(MicroBatches(self.dataset, micro_batch_size=self.cfg.train.micro_batch_size,
                                 dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp_size))

    def callbacks(self) -> list:
        train = self.cfg.train
        if train.precision == "fp8" and train.fp8_shadow_interval:
            from training.train.fp8_monitor import Fp8ShadowMonitor

            return [Fp8ShadowMonitor(train.fp8_shadow_interval, train.fp8_shadow_threshold)]
        return []

    @property
    def consumed_samples(self) -> int:
        return self.batches.consumed_samples

    # -- one step ----------------------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        """megatron's forward_step_func: the next micro-batch on this rank's device (and CP share), then the loss."""
        batch = {key: value.to(self.device, non_blocking=True) for key, value in next(data_iterator).items()}
        batch = self.vocabulary.batch_to_rows(batch)   # DeepSeek ids -> embedding rows (identity: full tokenizer)
        if self.cfg.parallel.context_parallel_size > 1:   # this rank's 2 of the sequence's 2 x CP chunks
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        return self.loss(model, batch)

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        train = self.cfg.train
        batch_size = self.ramp.batch_size(self.consumed_samples)
        num_microbatches = batch_size // self.ramp.per_step
        for chunk in self.wrapped:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=self.forward_step, model=self.wrapped,
            data_iterator=self.chunk_batches if len(self.wrapped) > 1 else self.batches,
            num_microbatches=num_microbatches, seq_length=self.seq_length,
            micro_batch_size=train.micro_batch_size, forward_only=False)
        # Child-Tuning masks this step's update inside the optimizer step (after clipping); it draws _F's mask from
        # the step number, which the scheduler counts (and checkpoints).
        with self.child_tuning.masking(self.scheduler.num_steps) if self.child_tuning else nullcontext():
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        step_losses = losses.global_mean_losses(reported, self.loss.reported)
        return {self.loss_name: step_losses.pop(self.loss_name), "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], "batch_size": float(batch_size), **step_losses,
                **losses.auxiliary_losses(self.cfg.model, num_microbatches)}

    # -- initial weights ---------------------------------------------------------------------------------------------
    def initialise_from(self, release: Path, ref: str) -> None:
        """A release's weights into every chunk, checked against the configured architecture (the context fields may
        differ), then copied into the optimizer's fp32 master weights."""
        from training import checkpoint
        from training.model.release import read_model_config

        differences = self.cfg.model.architecture_differences(read_model_config(release).model_dump(mode="json"),
                                                              allowed=ModelConfig.CONTEXT_FIELDS)
        if differences:
            raise ValueError(f"init_checkpoint {ref}: its model architecture differs from the config "
                             f"({'; '.join(differences)}); only model.rope_scaling and "
                             f"model.max_position_embeddings may change when starting from a checkpoint")
        checkpoint.load_weights(release, self.model)
        self.optimizer.reload_model_params()
