"""The `sft` stage: supervised fine-tuning of a released model on conversations (DeepSeek-V3 §5.1, DeepSeek-R1 §2.3).

config -> data (conversation records, or the task suite's train split generated into the run, rendered in
DeepSeek-V3's chat template with the model's vocabulary; bad records set aside with their reason; samples packed and
kept apart: training/data/sft_data.py) + loss (next-token cross-entropy on assistant tokens only) -> trainer, from the
parent release's weights (pinned, verified and recorded as code_cpt does: training/stages/parent.py), keeping the
parent's context (a YaRN-extended parent stays extended). `epochs` sets the step count once the data is packed. The
manifest records the parent and the data (its files, digest, counts and rejects), which register turns into the
version's lineage.
"""
from __future__ import annotations

import hashlib
import json
import math

from training import storage
from training.config.sft import SftConfig
from training.parallel.setup import distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.stages.parent import fetch_parent, pin_parent, record_parent, started_from, with_parent_context
from training.stages.pretrain import trained_outcome

TASK_DATA = "data/tasks_train.jsonl"


class SftError(ValueError):
    """Bad input found before training (no data, no usable conversation, a warm-up longer than the run); the message
    names the field. Not retried (`permanent`)."""

    permanent = True   # under the stage: the generated task suite, when `data` is None


def run(cfg: SftConfig) -> dict | None:
    parent = pin_parent(cfg)
    inputs = {"parent": parent["uri"], "data": data_fingerprint(cfg)}
    return run_stage(cfg, inputs, lambda stage: train(cfg, parent, stage))


def data_fingerprint(cfg: SftConfig) -> dict:
    """What the data input is: the task suite's settings, or the files under `data` with their sizes."""
    if cfg.data is None:
        return {"tasks": cfg.tasks.model_dump()}
    files = [[uri, size] for uri, size in storage.list_files(cfg.data)]
    if not files:
        raise SftError(f"data: no files under {cfg.data}")
    return {"uri": cfg.data, "files": files}


def train(cfg: SftConfig, parent: dict, stage: StageRun) -> Outcome:
    from training.train.trainer import InitialWeights

    with distributed(cfg.parallel, cfg.seed) as info:
        release = fetch_parent(cfg, parent, stage, allowed=type(cfg.model).CONTEXT_FIELDS)
        cfg = with_parent_context(cfg, release)
        packed, data = packed_conversations(cfg, stage, info)
        cfg = with_epoch_steps(cfg, len(packed))
        print(f"{stage.name}: {data['conversations']} conversations in {len(packed)} sequences of "
              f"{cfg.train.seq_length} tokens ({packed.fill:.0%} filled); {cfg.train.steps} steps", flush=True)
        with stage.tracking(enabled=info.is_main) as mlflow_run:
            start = InitialWeights(parent["uri"], lambda: record_parent(stage, parent, release))
            metrics = build_trainer(cfg, packed, stage, info, start, cfg.child_tuning).fit(mlflow_run)
            lineage = started_from(stage, parent, release)
            if mlflow_run:
                import mlflow

                mlflow.log_params({"sft.conversations": data["conversations"], "sft.sequences": len(packed),
                                   "sft.rejected": data["rejected"], "sft.steps": cfg.train.steps})
                mlflow.set_tags({"seekflow.init_checkpoint": lineage["ref"], "seekflow.sft_data": data["uri"]})
            run_id = mlflow_run.info.run_id if mlflow_run else None
    outcome = trained_outcome(stage, metrics, run_id, parent=lineage)
    outcome.outputs["data"] = data
    return outcome


def packed_conversations(cfg: SftConfig, stage: StageRun, info):
    """The conversations, encoded with the model's vocabulary and packed; and the data record for the manifest.
    Every rank reads and packs the same data (deterministic); one rank per node writes the generated task data."""
    import torch.distributed as dist

    from training.verify import tasks

    uri = cfg.data
    if uri is None:
        path = stage.directory / TASK_DATA
        if info.local_rank == 0:
            records = [item.conversation(cfg.reasoning) for task in cfg.tasks.tasks
                       for item in tasks.generate(task, "train", cfg.tasks.train_items, seed=cfg.tasks.seed)]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        dist.barrier()
        uri = str(path)
    return pack_conversations(cfg, uri, stage, generated=cfg.data is None)


def pack_conversations(cfg, uri: str, stage: StageRun, generated: bool):
    """(packed samples, data record) of the conversation files under `uri` for a training config with
    `max_reject_ratio` (sft, distill): encoded with `model`'s vocabulary, bad records set aside, packed into
    train.seq_length tokens."""
    from training import tokenizer as T
    from training.data.chat import load_conversations
    from training.data.sft_data import PackedSamples
    from training.vocabulary import vocabulary

    tokenizer = vocabulary(cfg.model.vocab_merges).tokenizer
    # seq_length + 1 ids make seq_length (token, label) pairs: the longest conversation one sequence holds.
    conversations, tally = load_conversations(uri, cfg.train.seq_length + 1, stage.directory / "rejects.jsonl",
                                              cfg.max_reject_ratio, tokenizer=tokenizer)
    if not conversations:
        raise SftError(f"data: no usable conversation under {uri} (rejects: {stage.directory / 'rejects.jsonl'})")
    packed = PackedSamples([(c.ids, c.loss_mask) for c in conversations], cfg.train.seq_length,
                           pad_id=T.token_id(T.PAD), seed=cfg.seed)
    digest = hashlib.sha256()
    for c in conversations:
        digest.update(json.dumps(c.ids).encode())
    data = {"uri": uri, "generated": generated, **tally.summary(), "sha256": digest.hexdigest(),
            "sequences": len(packed), "packed_tokens": packed.tokens}
    return packed, data


def with_epoch_steps(cfg, sequences: int):
    """`cfg` with train.steps = ceil(epochs x sequences / global_batch_size) when `epochs` is set."""
    if cfg.epochs is None:
        return cfg
    steps = max(1, math.ceil(cfg.epochs * sequences / cfg.train.global_batch_size))
    if cfg.optimizer.warmup_steps >= steps:
        raise SftError(f"optimizer.warmup_steps ({cfg.optimizer.warmup_steps}) must be below the {steps} steps "
                          f"that epochs {cfg.epochs} over {sequences} sequences make")
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})


def build_trainer(cfg, packed, stage: StageRun, info, init_weights, child_tuning=None):
    """The GPT train module on the packed conversations, samples kept apart, loss on assistant tokens (`cfg`: a
    training config; `child_tuning`: a ChildTuningConfig, or None for plain fine-tuning)."""
    from training.train.callbacks import ExpertLoad
    from training.train.gpt_module import GPTTrainModule
    from training.train.losses import PackedNextTokenLoss
    from training.train.trainer import Trainer

    from training.train.child_tuning import ChildNetwork

    module = GPTTrainModule(cfg, info.device, loss=PackedNextTokenLoss(), dataset=lambda num_samples: packed,
                            child_tuning=child_tuning)
    callbacks = [ExpertLoad(stage.directory / "expert_load_heatmap.png")]
    # Child-Tuning_D's child network is fixed on the starting weights, first.
    if child_tuning is not None and child_tuning.mode == "task_driven":
        callbacks.insert(0, ChildNetwork())
    return Trainer(module, cfg.train, info, label=stage.name, directory=stage.directory, run_root=cfg.run_root,
                   init_weights=init_weights, callbacks=callbacks)
