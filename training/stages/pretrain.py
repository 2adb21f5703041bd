"""The `pretrain` stage: a DeepSeek-V3-shaped MoE trained with megatron-core, resumable, tracked in MLflow.

Runs under torchrun (or as one process). Every rank builds its part of the model; rank 0 logs to MLflow and prints
progress. The stage ends with a model-only release checkpoint and a manifest that `register` reads.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from training import checkpoint, metrics as moe_metrics, schedules, storage
from training.config import ModelConfig, PretrainConfig, config_hash
from training.manifest import finished, invalidate, manifest_hash, read_manifest, write_manifest
from training.model.release import write_model_config
from training.parallel.setup import init_distributed, shutdown
from training.stages.pretrain_losses import auxiliary_losses, global_mean_loss
from training.storage import stage_dir
from training.tracking import stage_run, tracking_uri

STAGE = "pretrain"


def run(cfg: PretrainConfig) -> dict:
    started = time.time()
    chash = config_hash(cfg)
    curate = read_manifest(cfg.data_manifest or storage.stage_uri(cfg.run_root, "curate"))
    inputs = {"data_manifest_hash": manifest_hash(curate)}
    if cfg.init_checkpoint:
        inputs["init_checkpoint"] = cfg.init_checkpoint
    done = finished(cfg.run_root, STAGE, chash, inputs)
    if done:
        print(f"pretrain: already finished with config {chash}; skipping", flush=True)
        return done
    info = init_distributed(cfg.parallel, cfg.seed)
    if info.is_main:   # an old manifest must not vouch for checkpoints this run is about to replace
        invalidate(cfg.run_root, STAGE)
    try:
        with stage_run(cfg, STAGE, chash, enabled=info.is_main) as mlflow_run:
            if mlflow_run and cfg.init_checkpoint:
                import mlflow

                mlflow.set_tag("seekflow.init_checkpoint", cfg.init_checkpoint)
            metrics = Trainer(cfg, curate, info).fit(mlflow_run)
            outputs = {"release_checkpoint": storage.join(storage.stage_uri(cfg.run_root, STAGE), "release"),
                       "checkpoints": storage.join(storage.stage_uri(cfg.run_root, STAGE), "checkpoints"),
                       "mlflow_run_id": mlflow_run.info.run_id if mlflow_run else None}
            manifest = None
            if info.is_main:
                result = {"final_loss": metrics["final_loss"], "steps": metrics["steps"],
                          "release_checkpoint": outputs["release_checkpoint"], "mlflow_run_id": outputs["mlflow_run_id"]}
                manifest = write_manifest(cfg.run_root, STAGE, config_hash=chash, inputs=inputs, outputs=outputs,
                                          metrics=metrics, started=started, result=result)
    except BaseException:
        shutdown(failed=True)
        raise
    shutdown()
    return manifest


class Trainer:
    def __init__(self, cfg: PretrainConfig, curate_manifest: dict, info):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from training.data.gpt_data import BatchRamp, MicroBatches, build_train_dataset, fetch_datasets
        from training.model.build import build_gpt

        if not distrib_optimizer.HAVE_APEX_OR_TE:
            cfg.check_checkpointable_without_fused_adam()
        self.cfg, self.info = cfg, info
        train, opt = cfg.train, cfg.optimizer
        vocab = curate_manifest["outputs"]["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({vocab})")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        ramp = train.batch_size_rampup   # megatron counts the ramp in samples
        self.ramp = BatchRamp(train.global_batch_size, train.micro_batch_size, self.dp_size, rampup=ramp and (
            ramp.start_batch_size, ramp.batch_size_increment, int(ramp.ramp_tokens // train.seq_length)))

        # With a virtual pipeline, each rank holds `vpp` model chunks (megatron's interleaved 1F1B schedule).
        vpp = cfg.parallel.virtual_pipeline_model_parallel_size
        bf16 = train.precision == "bf16"
        built = [build_gpt(cfg.model, cfg.parallel, seed=cfg.seed, vp_stage=v, bf16=bf16)
                 for v in (range(vpp) if vpp else [None])]
        chunks, self.tconfigs = [gpt for gpt, _ in built], [config for _, config in built]
        for gpt in chunks:   # built (and seeded) on the CPU; trained on this rank's device
            gpt.to(info.device)
        self.gpt = chunks if vpp else chunks[0]   # what checkpoints save: one model, or the list of chunks
        # bf16: megatron's mixed precision. Float16Module casts the weights (and first-stage inputs) to bf16 and the
        # outputs back to fp32; gradients are reduced in fp32 and the optimizer steps fp32 master weights.
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                                   grad_reduce_in_fp32=bf16)
        self.model = [DistributedDataParallel(config, ddp_config, Float16Module(config, gpt) if bf16 else gpt)
                      for gpt, config in built]
        tconfig = self.tconfigs[0]   # the schedule and finalize_model_grads read the first chunk's
        self.expert_load = moe_metrics.ExpertLoadTracker(torch.nn.ModuleList(chunks))
        if vpp and self.ramp.num_microbatches(0) < cfg.parallel.pipeline_model_parallel_size:
            raise ValueError(f"the interleaved schedule (parallel.virtual_pipeline_model_parallel_size) needs at "
                             f"least pipeline_model_parallel_size micro-batches per step; the first step has "
                             f"{self.ramp.num_microbatches(0)} (train.global_batch_size or batch_size_rampup."
                             f"start_batch_size / micro_batch_size / data-parallel size)")

        def finalize(*args, **kwargs):   # read the routers' token counts before finalize_model_grads zeroes them
            self.expert_load.snapshot()
            return finalize_model_grads(*args, **kwargs)

        tconfig.finalize_model_grads_func = finalize   # also updates the expert-bias (aux-loss-free)
        tconfig.no_sync_func = [m.no_sync for m in self.model] if vpp else self.model[0].no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
        ), self.model)
        scheduler_cls = OptimizerParamScheduler
        if opt.decay_style in ("deepseek-v3", "multi-step"):
            scheduler_cls = _token_scheduler_class(OptimizerParamScheduler, _lr_function(cfg, self.ramp.samples_after))
        self.scheduler = scheduler_cls(
            self.optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=train.steps,
            lr_decay_style=opt.decay_style if scheduler_cls is OptimizerParamScheduler else "constant",
            start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant")
        self.flops_per_token = moe_metrics.flops_per_token(cfg.model, train.seq_length)

        self.ckpt_root = stage_dir(cfg.run_root, STAGE) / "checkpoints"
        self.ckpt_root.mkdir(exist_ok=True)
        self.ckpt_remote = storage.uri_of(self.ckpt_root, cfg.run_root) if storage.is_remote(cfg.run_root) else None
        self.async_queue = None
        if train.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        resumed = checkpoint.load(self.ckpt_root, self.gpt, self.optimizer, self.scheduler, remote=self.ckpt_remote,
                                  model_config=cfg.model)
        if not resumed and cfg.init_checkpoint:
            self._initialise_from(cfg.init_checkpoint)
        self.step = resumed["step"] if resumed else 0
        consumed = resumed["consumed_samples"] if resumed else 0
        if resumed and info.is_main:
            print(f"pretrain: resumed from step {self.step} ({consumed} samples consumed)", flush=True)
            if consumed != self.ramp.samples_after(self.step):   # the batch sizes changed since the checkpoint
                print(f"pretrain: warning: {self.ramp.samples_after(self.step)} samples would be consumed after "
                      f"{self.step} steps with this batch size (ramp); a token-scheduled lr follows the step count, "
                      f"the data position (and γ, λ) the checkpoint's {consumed} samples", flush=True)
        if info.local_rank == 0:   # the ranks of a node share its disk: one download per node
            fetch_datasets(curate_manifest)
        dist.barrier()
        dataset = build_train_dataset(curate_manifest, seq_length=train.seq_length,
                                      num_samples=self.ramp.samples_after(train.steps), seed=cfg.seed,
                                      cache_dir=stage_dir(cfg.run_root, STAGE) / "index_cache")
        # One reader per model chunk, in step: each chunk's forward reads the micro-batch it is at.
        self.chunk_batches = [MicroBatches(dataset, micro_batch_size=train.micro_batch_size,
                                           dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp_size,
                                           consumed_samples=consumed) for _ in self.model]
        self.batches = self.chunk_batches[0]

    def _initialise_from(self, ref: str) -> None:
        """Start from a release's weights: fetched once per node, checked against the configured architecture
        (context fields may differ), loaded into every chunk, then copied into the optimizer's fp32 master weights."""
        from training.model.release import read_model_config

        if self.info.local_rank == 0:   # the ranks of a node share its disk: one download per node
            fetch_init_release(self.cfg)
        dist.barrier()
        release = fetch_init_release(self.cfg)   # already local: every rank gets the path
        differences = self.cfg.model.architecture_differences(read_model_config(release).model_dump(mode="json"),
                                                              allowed=ModelConfig.CONTEXT_FIELDS)
        if differences:
            raise ValueError(f"init_checkpoint {ref}: its model architecture differs from the config "
                             f"({'; '.join(differences)}); only model.rope_scaling and "
                             f"model.max_position_embeddings may change when starting from a checkpoint")
        checkpoint.load_weights(release, self.gpt)
        self.optimizer.reload_model_params()
        if self.info.is_main:
            print(f"pretrain: initialised the weights from {ref}", flush=True)

    # -- one step ------------------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = {key: value.to(self.info.device, non_blocking=True) for key, value in next(data_iterator).items()}
        if self.cfg.parallel.context_parallel_size > 1:   # this rank's 2 of the sequence's 2 x CP chunks
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        loss_mask = batch["loss_mask"].float()
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=loss_mask)

        def loss_func(per_token_loss):
            mask = loss_mask.view(-1)
            total = (per_token_loss.float().view(-1) * mask).sum()
            count = mask.sum()
            return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}

        return output, loss_func

    def _apply_token_schedules(self) -> None:
        """Set γ and λ for the coming step from the tokens consumed so far. megatron-core reads both from the
        TransformerConfig at use time: `moe_router_bias_update_rate` in finalize_model_grads' expert-bias update,
        `mtp_loss_scaling_factor` in GPTModel's MTP loss (so a live change takes effect on the next step)."""
        m = self.cfg.model
        tokens = self.batches.consumed_samples * self.cfg.train.seq_length
        for tconfig in self.tconfigs:   # one per model chunk
            if tconfig.moe_router_enable_expert_bias:
                tconfig.moe_router_bias_update_rate = schedules.switch_at(
                    tokens, m.moe_router_bias_update_rate, 0.0, m.moe_router_bias_update_until_tokens)
            if m.mtp_num_layers:
                tconfig.mtp_loss_scaling_factor = schedules.switch_at(
                    tokens, m.mtp_loss_scaling_factor, m.mtp_loss_scaling_factor_after,
                    m.mtp_loss_scaling_switch_tokens)

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        train = self.cfg.train
        self._apply_token_schedules()
        batch_size = self.ramp.batch_size(self.batches.consumed_samples)
        num_microbatches = batch_size // self.ramp.per_step
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, model=self.model,
            data_iterator=self.chunk_batches if len(self.model) > 1 else self.batches,
            num_microbatches=num_microbatches, seq_length=train.seq_length,
            micro_batch_size=train.micro_batch_size, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {"lm_loss": global_mean_loss(losses), "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], "batch_size": float(batch_size),
                **auxiliary_losses(self.cfg.model, num_microbatches)}

    # -- the loop --------------------------------------------------------------------------------------------------
    def fit(self, mlflow_run) -> dict:
        """Train to `train.steps`; every `log_interval` steps print progress and log window-averaged metrics."""
        train = self.cfg.train
        first_step, window, window_start, logged = self.step, [], time.time(), {}
        devices = dist.get_world_size() if dist.is_initialized() else 1
        while self.step < train.steps:
            metrics = self.train_step()
            if not math.isfinite(metrics["lm_loss"]):
                raise FloatingPointError(f"loss is {metrics['lm_loss']} at step {self.step}; stopping")
            window.append(metrics)
            if self.step % train.log_interval == 0 or self.step == train.steps:
                steps_per_s = len(window) / max(time.time() - window_start, 1e-9)
                logged = {key: sum(m.get(key, math.nan) for m in window) / len(window) for key in window[-1]}
                tokens_per_step = sum(m["batch_size"] for m in window) / len(window) * train.seq_length
                logged.update(lr=metrics["lr"], batch_size=metrics["batch_size"], steps_per_s=steps_per_s,
                              tokens_per_s=steps_per_s * tokens_per_step)
                logged.update(self._schedule_and_flops_metrics(logged["tokens_per_s"], devices))
                collected = self.expert_load.collect()   # a collective: every rank takes part
                if collected:
                    logged.update(moe_metrics.load_metrics(*collected))
                if self.info.is_main:
                    self._report(logged, steps_per_s, mlflow_run)
                window, window_start = [], time.time()
            if self.async_queue:   # a collective: completes a background save once every rank's writer is done
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            if self.step % train.save_interval == 0 or self.step == train.steps:
                self._save()
        if self.async_queue:
            self.async_queue.maybe_finalize_async_calls(blocking=True)
            self.async_queue.close()
        if self.info.is_main and mlflow_run and self.expert_load.total is not None:
            self._log_heatmap()
        release_dir = stage_dir(self.cfg.run_root, STAGE) / "release"
        if self.info.is_main:   # a remote release from an earlier run must not keep files this layout won't write
            storage.delete(storage.uri_of(release_dir, self.cfg.run_root))
        release = checkpoint.save_release(release_dir, self.gpt)
        if self.info.is_main:
            write_model_config(release, self.cfg.model)
        dist.barrier()
        if self.info.local_rank == 0:
            storage.publish(release)   # s3 run roots: upload (each node its ranks' files); local: nothing to do
        dist.barrier()
        if self.info.is_main:
            print(f"pretrain: release checkpoint at {storage.uri_of(release, self.cfg.run_root)}", flush=True)
        return {"final_loss": logged.get("lm_loss", math.nan), "steps": self.step,
                "steps_this_run": self.step - first_step,
                "tokens": self.batches.consumed_samples * train.seq_length}

    def _report(self, logged: dict, steps_per_s: float, mlflow_run) -> None:
        steps = self.cfg.train.steps
        eta = (steps - self.step) / steps_per_s
        mtp = f"mtp {logged['mtp_loss']:.4f} " if "mtp_loss" in logged else ""   # a model without MTP: none
        print(f"pretrain: step {self.step}/{steps} loss {logged['lm_loss']:.4f} "
              f"{mtp}lr {logged['lr']:.2e} gnorm {logged['grad_norm']:.3f} "
              f"{steps_per_s:.2f} steps/s {logged['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s", flush=True)
        if mlflow_run:
            import mlflow

            mlflow.log_metrics({k: v for k, v in logged.items() if math.isfinite(v)}, step=self.step)

    def _schedule_and_flops_metrics(self, tokens_per_s: float, devices: int) -> dict:
        out = {"tokens": float(self.batches.consumed_samples * self.cfg.train.seq_length),
               "model_tflops_per_s": tokens_per_s * self.flops_per_token / 1e12}
        utilisation = moe_metrics.mfu(tokens_per_s, self.flops_per_token, self.cfg.train.peak_flops_per_device,
                                      devices)
        if math.isfinite(utilisation):
            out["mfu"] = utilisation
        tconfig = self.tconfigs[0]
        if tconfig.moe_router_enable_expert_bias:
            out["moe/bias_update_rate"] = float(tconfig.moe_router_bias_update_rate)
        if self.cfg.model.mtp_num_layers:
            out["mtp_loss_weight"] = float(tconfig.mtp_loss_scaling_factor)
        return out

    def _log_heatmap(self) -> None:
        import mlflow

        path = stage_dir(self.cfg.run_root, STAGE) / "expert_load_heatmap.png"
        moe_metrics.expert_load_heatmap(self.expert_load.total, self.expert_load.labels, path)
        mlflow.log_artifact(str(path), artifact_path="moe")

    def _save(self):
        if self.async_queue:   # one background save at a time: the previous one must be complete first
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        started = time.time()
        common = {"step": self.step, "consumed_samples": self.batches.consumed_samples,
                  checkpoint.MODEL_CONFIG: self.cfg.model.model_dump(mode="json")}
        path = checkpoint.save(self.ckpt_root, self.step, self.gpt, self.optimizer, self.scheduler, common,
                               keep_last=self.cfg.train.keep_last, remote=self.ckpt_remote,
                               async_queue=self.async_queue)
        if self.info.is_main:
            how = "started a background save of" if self.async_queue else "saved"
            print(f"pretrain: {how} {path.name} in {time.time() - started:.1f}s", flush=True)


def fetch_init_release(cfg: PretrainConfig):
    """The local release directory of `cfg.init_checkpoint`: a path, an s3:// URI (mirrored) or a registered version
    (downloaded under the stage directory once)."""
    from training.eval.registry import download_release, is_registry_ref, resolve_version
    from training.model.release import check_release

    ref = cfg.init_checkpoint
    if is_registry_ref(ref):
        import mlflow
        from mlflow import MlflowClient

        uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(uri)   # download_artifacts resolves mlflow-artifacts:/ through it
        version = resolve_version(MlflowClient(tracking_uri=uri, registry_uri=uri), ref)
        return download_release(version, stage_dir(cfg.run_root, STAGE) / "init")
    return check_release(storage.fetch(ref))


def _lr_function(cfg: PretrainConfig, samples_after=None):
    """lr(step) for the token-scheduled decay styles. `samples_after(step)` gives the samples consumed before the
    step (a batch-size ramp makes it non-linear); default: a fixed global_batch_size."""
    opt, train = cfg.optimizer, cfg.train
    samples_after = samples_after or (lambda step: step * train.global_batch_size)

    def tokens(step: int) -> float:
        return samples_after(step) * train.seq_length

    if opt.decay_style == "deepseek-v3":
        return lambda step: schedules.deepseek_v3_lr(
            step, tokens(step), peak=opt.lr, min_lr=opt.min_lr, warmup_steps=opt.warmup_steps,
            constant_tokens=opt.constant_tokens, decay_tokens=opt.decay_tokens, tail=opt.lr_tail)
    return lambda step: schedules.multi_step_lr(
        step, tokens(step), peak=opt.lr, warmup_steps=opt.warmup_steps, total_tokens=tokens(train.steps),
        steps=opt.lr_steps)


def _token_scheduler_class(base, lr_at):
    """megatron-core's OptimizerParamScheduler (state dict, weight decay, checkpointing) with our lr function."""

    class TokenScheduledLR(base):
        def get_lr(self, param_group: dict) -> float:
            return lr_at(self.num_steps)

    return TokenScheduledLR
