"""The `pretrain` stage: a DeepSeek-V3-shaped MoE trained with megatron-core, resumable, tracked in MLflow.

config -> data (the curate stage's blended datasets) + loss (next-token cross-entropy) -> trainer. Runs under
torchrun (or as one process): every rank builds its part of the model; rank 0 logs to MLflow and prints progress.
The stage ends with a model-only release checkpoint and a manifest that `register` reads. With `init_checkpoint`, a
fresh run starts from a release's weights (a path, s3:// or models:/ reference, resolved by training.registry).
"""
from __future__ import annotations

import torch.distributed as dist

from training import registry, storage
from training.config import PretrainConfig
from training.manifest import manifest_hash, read_manifest
from training.parallel.setup import distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.tracking import tracking_uri
from training.vocabulary import check_data


def run(cfg: PretrainConfig) -> dict | None:
    curate = read_manifest(cfg.data_manifest or storage.stage_uri(cfg.run_root, "curate"))
    check_data(curate["outputs"]["tokenizer"], cfg.model)
    inputs = {"data_manifest_hash": manifest_hash(curate)}
    if cfg.init_checkpoint:
        inputs["init_checkpoint"] = cfg.init_checkpoint
    return run_stage(cfg, inputs, lambda stage: train(cfg, curate, stage))


def train(cfg: PretrainConfig, curate: dict, stage: StageRun) -> Outcome:
    with distributed(cfg.parallel, cfg.seed) as info, stage.tracking(enabled=info.is_main) as mlflow_run:
        if mlflow_run and cfg.init_checkpoint:
            import mlflow

            mlflow.set_tag("seekflow.init_checkpoint", cfg.init_checkpoint)
        metrics = build_trainer(cfg, curate, stage, info).fit(mlflow_run)
        run_id = mlflow_run.info.run_id if mlflow_run else None
    return trained_outcome(stage, metrics, run_id)


def trained_outcome(stage: StageRun, metrics: dict, run_id: str | None, parent: dict | None = None) -> Outcome:
    """What a training stage leaves for evaluate and register: its release, checkpoints, MLflow run and, when it
    continued another model, that parent (`outputs.parent`, the lineage register tags)."""
    release = storage.join(stage.uri, "release")
    outputs = {"release_checkpoint": release, "checkpoints": storage.join(stage.uri, "checkpoints"),
               "mlflow_run_id": run_id}
    result = {"final_loss": metrics["final_loss"], "steps": metrics["steps"], "release_checkpoint": release,
              "mlflow_run_id": run_id}
    if parent is not None:
        outputs["parent"], result["parent"] = parent, parent["uri"]
    return Outcome(outputs, metrics, result)


def build_trainer(cfg: PretrainConfig, curate: dict, stage: StageRun, info):
    """The GPT train module on the curated data with the next-token loss, in the Trainer with the MoE callbacks."""
    from training.train.callbacks import ExpertLoad, TokenSchedules
    from training.train.gpt_module import GPTTrainModule
    from training.train.losses import NextTokenLoss
    from training.train.trainer import InitialWeights, Trainer

    init_weights = None
    if cfg.init_checkpoint:
        init_weights = InitialWeights(cfg.init_checkpoint, lambda: registry.resolve_release_on_every_rank(
            cfg.init_checkpoint, tracking_uri=tracking_uri(cfg), into=stage.directory / "init"))
    module = GPTTrainModule(cfg, info.device, loss=NextTokenLoss(), dataset=lambda num_samples: (
        curated_dataset(cfg, curate, stage, info.local_rank, num_samples)))
    return Trainer(module, cfg.train, info, label=stage.name, directory=stage.directory, run_root=cfg.run_root,
                   init_weights=init_weights, callbacks=[TokenSchedules(cfg.model, cfg.train.seq_length),
                                                        ExpertLoad(stage.directory / "expert_load_heatmap.png")])


def curated_dataset(cfg: PretrainConfig, curate: dict, stage: StageRun, local_rank: int, num_samples: int):
    """The curate stage's datasets blended by their weights: `num_samples` sequences of train.seq_length + 1 tokens."""
    from training.data.gpt_data import build_train_dataset, fetch_datasets

    if local_rank == 0:   # the ranks of a node share its disk: one download per node
        fetch_datasets(curate)
    dist.barrier()
    return build_train_dataset(curate, seq_length=cfg.train.seq_length, num_samples=num_samples, seed=cfg.seed,
                               cache_dir=stage.directory / "index_cache")
