"""The `pretrain` stage: a DeepSeek-V3-shaped MoE trained with megatron-core, resumable, tracked in MLflow.

Runs under torchrun (or as one process). Every rank builds its part of the model; rank 0 logs to MLflow and prints
progress. The stage ends with a model-only release checkpoint and a manifest that `register` reads.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from training import checkpoint, storage
from training.config import PretrainConfig, config_hash
from training.manifest import finished, invalidate, manifest_hash, read_manifest, write_manifest
from training.model.release import write_model_config
from training.parallel.setup import init_distributed, shutdown
from training.storage import stage_dir
from training.tracking import stage_run

STAGE = "pretrain"


def run(cfg: PretrainConfig) -> dict:
    started = time.time()
    chash = config_hash(cfg)
    curate = read_manifest(cfg.data_manifest or storage.stage_uri(cfg.run_root, "curate"))
    inputs = {"data_manifest_hash": manifest_hash(curate)}
    done = finished(cfg.run_root, STAGE, chash, inputs)
    if done:
        print(f"pretrain: already finished with config {chash}; skipping", flush=True)
        return done
    info = init_distributed(cfg.parallel, cfg.seed)
    if info.is_main:   # an old manifest must not vouch for checkpoints this run is about to replace
        invalidate(cfg.run_root, STAGE)
    try:
        with stage_run(cfg, STAGE, chash, enabled=info.is_main) as mlflow_run:
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
        return manifest
    finally:
        shutdown()


class Trainer:
    def __init__(self, cfg: PretrainConfig, curate_manifest: dict, info):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from training.data.gpt_data import MicroBatches, build_train_dataset, fetch_datasets
        from training.model.build import build_gpt

        self.cfg, self.info = cfg, info
        train, opt = cfg.train, cfg.optimizer
        vocab = curate_manifest["outputs"]["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({vocab})")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        per_step = train.micro_batch_size * self.dp_size
        if train.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                             f"micro_batch_size x data-parallel size ({per_step})")
        self.num_microbatches = train.global_batch_size // per_step

        self.gpt, tconfig = build_gpt(cfg.model, cfg.parallel)
        self.model = DistributedDataParallel(
            tconfig, DistributedDataParallelConfig(use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
            self.gpt)
        tconfig.finalize_model_grads_func = finalize_model_grads   # also updates the expert-bias (aux-loss-free)
        tconfig.no_sync_func = self.model.no_sync
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer, params_dtype=torch.float32,
        ), [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps,
            lr_decay_steps=train.steps, lr_decay_style=opt.decay_style, start_wd=opt.weight_decay,
            end_wd=opt.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant")

        self.ckpt_root = stage_dir(cfg.run_root, STAGE) / "checkpoints"
        self.ckpt_root.mkdir(exist_ok=True)
        self.ckpt_remote = storage.uri_of(self.ckpt_root, cfg.run_root) if storage.is_remote(cfg.run_root) else None
        resumed = checkpoint.load(self.ckpt_root, self.gpt, self.optimizer, self.scheduler, remote=self.ckpt_remote)
        self.step = resumed["step"] if resumed else 0
        consumed = resumed["consumed_samples"] if resumed else 0
        if resumed and info.is_main:
            print(f"pretrain: resumed from step {self.step} ({consumed} samples consumed)", flush=True)
        if info.local_rank == 0:   # the ranks of a node share its disk: one download per node
            fetch_datasets(curate_manifest)
        dist.barrier()
        dataset = build_train_dataset(curate_manifest, seq_length=train.seq_length,
                                      num_samples=train.steps * train.global_batch_size, seed=cfg.seed,
                                      cache_dir=stage_dir(cfg.run_root, STAGE) / "index_cache")
        self.batches = MicroBatches(dataset, micro_batch_size=train.micro_batch_size,
                                    dp_rank=parallel_state.get_data_parallel_rank(), dp_size=self.dp_size,
                                    consumed_samples=consumed)

    # -- one step ------------------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        loss_mask = batch["loss_mask"].float()
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=loss_mask)

        def loss_func(per_token_loss):
            mask = loss_mask.view(-1)
            total = (per_token_loss.float().view(-1) * mask).sum()
            count = mask.sum()
            return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}

        return output, loss_func

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        train = self.cfg.train
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=self.batches, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=train.seq_length,
            micro_batch_size=train.micro_batch_size, forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {"lm_loss": _global_mean_loss(losses), "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], **_auxiliary_losses(self.num_microbatches)}

    # -- the loop --------------------------------------------------------------------------------------------------
    def fit(self, mlflow_run) -> dict:
        """Train to `train.steps`; every `log_interval` steps print progress and log window-averaged metrics."""
        train = self.cfg.train
        tokens_per_step = train.global_batch_size * train.seq_length
        first_step, window, window_start, logged = self.step, [], time.time(), {}
        while self.step < train.steps:
            metrics = self.train_step()
            if not math.isfinite(metrics["lm_loss"]):
                raise FloatingPointError(f"loss is {metrics['lm_loss']} at step {self.step}; stopping")
            window.append(metrics)
            if self.step % train.log_interval == 0 or self.step == train.steps:
                steps_per_s = len(window) / max(time.time() - window_start, 1e-9)
                logged = {key: sum(m.get(key, math.nan) for m in window) / len(window) for key in window[-1]}
                logged.update(lr=metrics["lr"], steps_per_s=steps_per_s, tokens_per_s=steps_per_s * tokens_per_step)
                if self.info.is_main:
                    self._report(logged, steps_per_s, mlflow_run)
                window, window_start = [], time.time()
            if self.step % train.save_interval == 0 or self.step == train.steps:
                self._save()
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
                "steps_this_run": self.step - first_step, "tokens": self.step * tokens_per_step}

    def _report(self, logged: dict, steps_per_s: float, mlflow_run) -> None:
        steps = self.cfg.train.steps
        eta = (steps - self.step) / steps_per_s
        print(f"pretrain: step {self.step}/{steps} loss {logged['lm_loss']:.4f} "
              f"mtp {logged.get('mtp_loss', math.nan):.4f} lr {logged['lr']:.2e} gnorm {logged['grad_norm']:.3f} "
              f"{steps_per_s:.2f} steps/s {logged['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s", flush=True)
        if mlflow_run:
            import mlflow

            mlflow.log_metrics({k: v for k, v in logged.items() if math.isfinite(v)}, step=self.step)

    def _save(self):
        started = time.time()
        common = {"step": self.step, "consumed_samples": self.batches.consumed_samples}
        path = checkpoint.save(self.ckpt_root, self.step, self.gpt, self.optimizer, self.scheduler, common,
                               keep_last=self.cfg.train.keep_last, remote=self.ckpt_remote)
        if self.info.is_main:
            print(f"pretrain: saved {path.name} in {time.time() - started:.1f}s", flush=True)


def _global_mean_loss(losses: list[dict]) -> float:
    """Token-weighted mean LM loss over micro-batches and data-parallel ranks (only last pipeline stages have it)."""
    local = torch.zeros(2)
    for item in losses or []:
        local += item["lm loss"].detach().float().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local)
    return (local[0] / local[1].clamp(min=1)).item()


def _auxiliary_losses(num_microbatches: int) -> dict:
    """MTP and MoE balance losses from megatron-core's trackers (local to this rank), then reset them."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    out = {}
    mtp = MTPLossLoggingHelper.tracker
    if "values" in mtp:
        out["mtp_loss"] = (mtp["values"].sum() / num_microbatches).item()
        MTPLossLoggingHelper.clean_loss_in_tracker()
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        values = entry["values"]
        used = values[values != 0]
        if used.numel():
            out[name] = (used.mean() / num_microbatches).item()
    clear_aux_losses_tracker()
    return out
