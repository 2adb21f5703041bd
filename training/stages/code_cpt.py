"""The `code_cpt` stage: continued pretraining of a released model on a code-heavy mixture with fill-in-the-middle, as
DeepSeek-Coder-V2 continues DeepSeek-V2 (arXiv:2406.11931 §2-3).

config -> data (the curate manifest's sources reweighted by `mixture`, blended by megatron-core; the code carries FIM
documents made at packing time, at the rate `fim_rate` checks) + loss (next-token cross-entropy on every token, FIM
documents included, as §3.1) -> trainer, from the parent release's weights. The parent is pinned before anything
runs (`models:/name@alias` -> `models:/name/<version>`), hash-verified, refused unless its architecture is `model`,
recorded at the first start (`parent.json`, kept on resume) and in the manifest (`outputs.parent`, which register
turns into `seekflow.parent_version`).
"""
from __future__ import annotations

import math

from training import storage
from training.config.code_cpt import CodeCptConfig
from training.config.curate import CODE_KINDS
from training.manifest import manifest_hash, read_manifest
from training.parallel.setup import distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.stages.parent import fetch_parent, pin_parent, record_parent, started_from
from training.stages.pretrain import curated_dataset, trained_outcome
from training.vocabulary import check_data

class CodeCptError(ValueError):
    """Bad input found before training; the message names the field. Not retried (`permanent`)."""

    permanent = True


def run(cfg: CodeCptConfig) -> dict | None:
    curate = read_manifest(cfg.data_manifest or storage.stage_uri(cfg.run_root, cfg.upstream("curate")))
    mixture = mixed(cfg, curate)
    check_data(curate["outputs"]["tokenizer"], cfg.model)
    parent = pin_parent(cfg)
    inputs = {"data_manifest_hash": manifest_hash(curate), "parent": parent["uri"]}
    return run_stage(cfg, inputs, lambda stage: train(cfg, mixture, parent, stage))


def mixed(cfg: CodeCptConfig, curate: dict) -> dict:
    """The curate manifest with only the datasets to blend, weighted by `mixture` (default: the manifest's weights);
    its code sources must have been curated with FIM at `fim_rate`."""
    datasets = {d.get("name"): d for d in curate["outputs"]["datasets"]}
    weights = cfg.mixture or {name: d["weight"] for name, d in datasets.items()}
    for name in weights:
        if name not in datasets:
            raise CodeCptError(f"mixture.{name}: the curate manifest has no such source (it has: "
                               f"{', '.join(map(str, datasets))})")
    chosen = [{**datasets[name], "weight": float(weight)} for name, weight in weights.items()]
    code = [d for d in chosen if d.get("kind") in CODE_KINDS]
    rates = {d["name"]: d.get("fim", {}).get("rate", 0.0) for d in code}
    off = [(name, rate) for name, rate in rates.items() if not math.isclose(rate, cfg.fim_rate or 0.0)]
    if cfg.fim_rate is not None and (off or not code and cfg.fim_rate > 0):
        what = (f"the code source {off[0][0]!r} was curated with fim.rate {off[0][1]}" if off else
                f"the mixture has no code source ({', '.join(CODE_KINDS)})")
        raise CodeCptError(f"fim_rate: {cfg.fim_rate}, but {what}; curate the code with sources[].fim.rate "
                           f"{cfg.fim_rate} (e.g. a curate_code instance) or change fim_rate")
    return {**curate, "outputs": {**curate["outputs"], "datasets": chosen}}


def train(cfg: CodeCptConfig, curate: dict, parent: dict, stage: StageRun) -> Outcome:
    from training.train.trainer import InitialWeights

    with distributed(cfg.parallel, cfg.seed) as info:
        release = fetch_parent(cfg, parent, stage)
        with stage.tracking(enabled=info.is_main) as mlflow_run:
            start = InitialWeights(parent["uri"], lambda: record_parent(stage, parent, release))
            metrics = build_trainer(cfg, curate, stage, info, start).fit(mlflow_run)
            lineage = started_from(stage, parent, release)
            if mlflow_run:
                import mlflow

                mlflow.set_tags({"seekflow.init_checkpoint": lineage["ref"], "seekflow.parent_version":
                                 lineage["uri"] if lineage["version"] else "none"})
            run_id = mlflow_run.info.run_id if mlflow_run else None
    return trained_outcome(stage, metrics, run_id, parent=lineage)


def build_trainer(cfg: CodeCptConfig, curate: dict, stage: StageRun, info, init_weights):
    """The GPT train module on the mixture with the next-token loss (or KSSM's, with `kssm`), in the Trainer with
    pretrain's MoE callbacks."""
    from training.train.callbacks import ExpertLoad, TokenSchedules
    from training.train.gpt_module import GPTTrainModule
    from training.train.losses import NextTokenLoss
    from training.train.trainer import Trainer

    loss = NextTokenLoss()
    if cfg.kssm is not None:   # knowledge CPT: KSSM's salient-span and attention objectives (training/train/kssm.py)
        from training.train.kssm import SalientSpanLoss
        from training.vocabulary import vocabulary

        loss = SalientSpanLoss(vocabulary(cfg.model.vocab_merges), cfg.kssm.span_weight, cfg.kssm.attention_weight,
                               cfg.kssm.model_fraction, decoder_layers=cfg.model.num_layers)
    module = GPTTrainModule(cfg, info.device, loss=loss, dataset=lambda num_samples: (
        curated_dataset(cfg, curate, stage, info.local_rank, num_samples)))
    return Trainer(module, cfg.train, info, label=stage.name, directory=stage.directory, run_root=cfg.run_root,
                   init_weights=init_weights, callbacks=[TokenSchedules(cfg.model, cfg.train.seq_length),
                                                        ExpertLoad(stage.directory / "expert_load_heatmap.png")])
