"""The `compress` stage: contrastive pruning (CAP; Xu et al., AAAI 2022) of a fine-tuned model to a target sparsity.

config -> the fine-tuned and pre-trained releases (pinned, verified; both of the stage's `model` architecture) ->
data (the task suite's train split, one conversation per sequence, each input's task its label) -> banks (each
reference model represents every input once: training/train/cap.py) -> trainer, from the fine-tuned weights (or the
pre-trained ones, `start`), with the loss ce_weight x task loss + PrC + FiC + SnC and the `Pruner` callback, which
prunes on the schedule, keeps pruned weights at zero and takes SnC's snapshots (training/train/pruner.py).

The release holds the pruned weights as zeros (megatron-core's format, so evaluate, register and the HF export read
it as any other). The manifest names the starting model as the parent and both inputs as `outputs.parents`, and
records the pruning (`outputs.pruning`: structure, target and reached sparsity, non-zero parameters), which register
turns into the version's tags.
"""
from __future__ import annotations

from training.config import ParallelConfig
from training.config.compress import CompressConfig
from training.parallel.setup import distributed
from training.stages.distill import student_layout
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.stages.parent import fetch_parent, pin_parent, record_parent, started_from, with_parent_context
from training.stages.pretrain import trained_outcome
from training.stages.sft import with_epoch_steps

REFERENCES = ("fine_tuned", "pretrained")


class CompressError(ValueError):
    """Bad input found before training (a missing model, inputs too long for a sequence); names the field. Not
    retried."""

    permanent = True


def run(cfg: CompressConfig) -> dict | None:
    refs = {"fine_tuned": pin_parent(cfg, field="fine_tuned", upstream="sft", error=CompressError),
            "pretrained": pin_parent(cfg, field="pretrained", upstream="pretrain", error=CompressError)}
    inputs = {name: ref["uri"] for name, ref in refs.items()}
    return run_stage(cfg, inputs, lambda stage: compress(cfg, refs, stage))


def compress(cfg: CompressConfig, refs: dict, stage: StageRun) -> Outcome:
    from training.train.trainer import InitialWeights

    with distributed(ParallelConfig(), cfg.seed) as info:   # every rank a whole reference model: the banks
        releases = {name: fetch_parent(cfg, refs[name], stage, allowed=type(cfg.model).CONTEXT_FIELDS, field=name,
                                       into=name) for name in REFERENCES}
        cfg = with_parent_context(cfg, releases["fine_tuned"])
        rows, data = task_rows(cfg)
        cfg = with_epoch_steps(cfg, len(rows))
        banks = reference_banks(cfg, releases, rows, info)
        info = student_layout(cfg)
        start, release = refs[cfg.start], releases[cfg.start]
        print(f"{stage.name}: {len(rows)} inputs of {cfg.tasks.tasks}; {cfg.train.steps} steps from {start['uri']} "
              f"to {cfg.pruning.structure} sparsity {cfg.pruning.sparsity} ({cfg.pruning.schedule})", flush=True)
        with stage.tracking(enabled=info.is_main) as mlflow_run:
            init = InitialWeights(start["uri"], lambda: record_parent(stage, start, release))
            trainer, pruner = build_trainer(cfg, rows, banks, stage, info, init)
            metrics = trainer.fit(mlflow_run)
            pruned = pruning_record(cfg, pruner, banks)
            lineage = started_from(stage, start, release)
            if mlflow_run:
                import mlflow

                mlflow.log_params({"compress.inputs": len(rows), "compress.structure": cfg.pruning.structure,
                                   "compress.target_sparsity": cfg.pruning.sparsity})
                mlflow.log_metrics({"nonzero_params": pruned["nonzero_params"], "final_sparsity": pruned["sparsity"]})
                mlflow.set_tags({f"seekflow.{name}": refs[name]["uri"] for name in REFERENCES})
            run_id = mlflow_run.info.run_id if mlflow_run else None
    outcome = trained_outcome(stage, metrics, run_id, parent=lineage)
    outcome.outputs.update(data=data, pruning=pruned, parents={
        name: lineage if name == cfg.start else reference_lineage(refs[name], releases[name])
        for name in REFERENCES})
    outcome.metrics.update(sparsity=pruned["sparsity"], nonzero_params=pruned["nonzero_params"])
    outcome.result.update(sparsity=pruned["sparsity"], nonzero_params=pruned["nonzero_params"])
    return outcome


def reference_lineage(ref: dict, release) -> dict:
    from training import integrity

    return {**ref, "release_sha256": integrity.marker_digest(release)}


def task_rows(cfg: CompressConfig):
    """The task suite's train split, one conversation per sequence (training/data/sft_data.py ConversationRows), and
    its data record. An item longer than a sequence is set aside (counted); too many fail the stage."""
    import hashlib
    import json

    from training import tokenizer as T
    from training.data.chat import encode_conversation
    from training.data.sft_data import ConversationRows
    from training.verify import tasks
    from training.vocabulary import vocabulary

    tokenizer = vocabulary(cfg.model.vocab_merges).tokenizer
    encoded, labels, too_long = [], [], 0
    for label, task in enumerate(cfg.tasks.tasks):
        for item in tasks.generate(task, "train", cfg.tasks.train_items, seed=cfg.tasks.seed):
            ids, mask = encode_conversation(item.conversation()["messages"], tokenizer)
            if len(ids) > cfg.train.seq_length + 1:
                too_long += 1
                continue
            encoded.append((ids, mask))
            labels.append(label)
    total = len(encoded) + too_long
    if not encoded or too_long > cfg.max_reject_ratio * total:
        raise CompressError(f"train.seq_length: {too_long} of {total} task items are longer than a sequence of "
                            f"{cfg.train.seq_length} tokens (max_reject_ratio {cfg.max_reject_ratio})")
    rows = ConversationRows(encoded, labels, cfg.train.seq_length, pad_id=T.token_id(T.PAD), seed=cfg.seed)
    digest = hashlib.sha256(json.dumps([ids for ids, _ in encoded]).encode()).hexdigest()
    data = {"tasks": cfg.tasks.model_dump(), "inputs": len(encoded), "too_long": too_long, "sha256": digest}
    return rows, data


def reference_banks(cfg: CompressConfig, releases: dict, rows, info):
    """CAP's banks: the pre-trained and fine-tuned models' representations of every input (a term whose weight is 0
    gets none)."""
    import torch

    from training.model.release import load_release
    from training.train.cap import RepresentationBanks
    from training.train.losses import clear_loss_trackers

    weights = {"pretrained": cfg.contrastive.prc_weight, "fine_tuned": cfg.contrastive.fic_weight}
    reps = {}
    for name, weight in weights.items():
        if weight > 0:
            gpt, _ = load_release(releases[name])
            gpt.to(info.device)
            reps[name] = representations(cfg, gpt, rows, info.device)
            del gpt
            clear_loss_trackers()   # the reference pass's balance and MTP losses are not the trained model's
    labels = torch.as_tensor([int(rows.by_id(i)["label"][0]) for i in range(len(rows))])
    return RepresentationBanks(reps.get("pretrained"), reps.get("fine_tuned"), labels, cfg.contrastive.max_snapshots)


def representations(cfg: CompressConfig, model, rows, device):
    """Every input's representation under `model` (a reference release, or the model being pruned), in batches of
    8 micro-batches, its tokens mapped to the vocabulary's rows."""
    from training.train.cap import represent
    from training.vocabulary import vocabulary

    vocab = vocabulary(cfg.model.vocab_merges)
    return represent(model, rows, cfg.train.micro_batch_size * 8, device, vocab.to_rows if vocab.is_subset else None)


def build_trainer(cfg: CompressConfig, rows, banks, stage: StageRun, info, init_weights):
    """(Trainer, Pruner): the GPT train module on the rows with CAP's loss, pruned by the Pruner callback."""
    from training.train.callbacks import ExpertLoad
    from training.train.cap import ContrastivePruningLoss
    from training.train.child_tuning import quiet_passes
    from training.train.gpt_module import GPTTrainModule
    from training.train.pruner import Pruner
    from training.train.trainer import Trainer

    loss = ContrastivePruningLoss(banks, cfg.contrastive, cfg.ce_weight, seed=cfg.seed)
    module = GPTTrainModule(cfg, info.device, loss=loss, dataset=lambda num_samples: rows)
    module.progress_fields = (("lm_loss", "lm"), ("prc_loss", "prc"), ("fic_loss", "fic"), ("snc_loss", "snc"),
                              ("sparsity", "sparsity"), *module.progress_fields)

    def current_representations():
        with quiet_passes(module):
            return representations(cfg, module.wrapped[0], rows, info.device)

    pruner = Pruner(module, cfg.pruning, cfg.model.num_attention_heads, stage.directory / "snapshots",
                    represent=current_representations if cfg.contrastive.snc_weight > 0 else None,
                    banks=banks if cfg.contrastive.snc_weight > 0 else None, loss=loss, is_main=info.is_main,
                    writes=info.local_rank == 0)
    trainer = Trainer(module, cfg.train, info, label=stage.name, directory=stage.directory, run_root=cfg.run_root,
                      init_weights=init_weights, callbacks=[pruner, ExpertLoad(stage.directory / "expert_load.png")])
    return trainer, pruner


def pruning_record(cfg: CompressConfig, pruner, banks) -> dict:
    """What the release's pruning is: the structure, the target and reached sparsity of the prunable weights, and
    the model's non-zero parameters (MTP apart, as the papers' totals leave it out)."""
    from training.train import pruning
    from training.train.pruner import counts

    zeros, total = counts({n: p for n, p in pruner.params.items() if not n.startswith("mtp.")})
    return {"structure": cfg.pruning.structure, "target_sparsity": cfg.pruning.sparsity,
            "sparsity": round(pruner.prunable_sparsity(), 6), "nonzero_params": total - zeros,
            "total_params": total, "prunable_params": counts(pruning.prunable(pruner.params))[1],
            "snapshot_steps": list(banks.snapshot_steps) if banks else []}
