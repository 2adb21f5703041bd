"""The `grpo` stage: Group Relative Policy Optimization with rule-based rewards, DeepSeek-R1-Zero's recipe
(DeepSeekMath §4.1; DeepSeek-R1 §2.2), in one process or under data, pipeline and expert parallelism (each
data-parallel rank samples its share of every rollout on its shard of the policy: training/rl/grpo_module.py).

config -> prompts (the task suite's train split, generated) + rewards (format, accuracy by the task checkers,
language consistency; training/rl/rewards.py) -> the GRPO train module (training/rl/grpo_module.py: every
`updates_per_rollout` steps the policy samples G completions per prompt through the KV cache, a frozen reference
scores them, and the megatron step trains on them with GRPOLoss) -> trainer, from the parent release's weights
(pinned, verified and recorded as sft does: training/stages/parent.py), keeping the parent's context. R1-Zero starts
from the base model, so the default parent is the pretrain stage's release.

A retry resumes from the last checkpoint, which is always on a rollout boundary, and redraws that rollout from the
restored weights (`rollout_seed`): the resumed run continues the uninterrupted one bit for bit. The manifest records
the parent (`outputs.parent`, which register turns into `seekflow.parent_version`) and the prompts.
"""
from __future__ import annotations

import math

from training.config.grpo import GrpoConfig
from training.parallel.setup import distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.stages.parent import fetch_parent, pin_parent, record_parent, started_from, with_parent_context
from training.stages.pretrain import trained_outcome

# The step metrics the manifest keeps (the last step's), besides the trainer's.
FINAL_METRICS = ("reward", "accuracy", "format_rate", "kl", "clip_fraction", "entropy", "response_length",
                 "zero_advantage_groups")


class GrpoError(ValueError):
    """Bad input found before training (a data-parallel size that does not divide the rollout, prompts that do not
    fit a sequence); the message names the field. Not retried (`permanent`)."""

    permanent = True


def run(cfg: GrpoConfig) -> dict | None:
    parent = pin_parent(cfg)
    inputs = {"parent": parent["uri"], "tasks": cfg.tasks.model_dump()}
    return run_stage(cfg, inputs, lambda stage: train(cfg, parent, stage))


def prompts(cfg: GrpoConfig) -> list:
    """The task suite's train items, every task's, in order (the module draws a seeded permutation)."""
    from training.verify import tasks

    return [item for task in cfg.tasks.tasks
            for item in tasks.generate(task, "train", cfg.tasks.train_items, seed=cfg.tasks.seed)]


def check_lengths(cfg: GrpoConfig, items: list) -> None:
    """Refuse, before training, prompts whose longest completion would not fit one sequence (the rollout's tokens
    less one: label positions)."""
    from training.data.chat import ChatTemplate, Message
    from training.rl.grpo_module import InstructionTemplate
    from training.tokenizer import REASONING_OPENER
    from training.vocabulary import vocabulary

    tokenizer = vocabulary(cfg.model.vocab_merges).tokenizer
    template = InstructionTemplate(ChatTemplate(tokenizer))
    system = [Message("system", cfg.system_prompt)] if cfg.system_prompt else []
    longest = max(len(template.prompt([*system, Message("user", item.prompt)])) for item in items)
    opener = REASONING_OPENER if cfg.format == "r1" else ""   # after the Assistant token, as the rollout writes it
    prefix = len(tokenizer.encode(opener, add_special_tokens=False).ids)
    if longest + prefix + cfg.max_new_tokens > cfg.train.seq_length:
        raise GrpoError(f"train.seq_length ({cfg.train.seq_length}) is shorter than the longest prompt ({longest} "
                        f"tokens with system_prompt) + {prefix} + max_new_tokens ({cfg.max_new_tokens}): raise it")


def check_data_parallel(cfg: GrpoConfig, ranks: int) -> None:
    """Every rank samples whole groups of each rollout and the update splits it evenly: refuse, naming the field,
    a data-parallel size that does not divide them."""
    if cfg.prompts_per_step % ranks:
        raise GrpoError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the {ranks} data-parallel "
                        f"ranks: each samples whole groups")
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * ranks):
        raise GrpoError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                        f"train.micro_batch_size x ranks ({cfg.train.micro_batch_size} x {ranks})")


def train(cfg: GrpoConfig, parent: dict, stage: StageRun) -> Outcome:
    from training.train.trainer import InitialWeights

    with distributed(cfg.parallel, cfg.seed) as info:
        from megatron.core import parallel_state

        check_data_parallel(cfg, parallel_state.get_data_parallel_world_size())
        release = fetch_parent(cfg, parent, stage, allowed=type(cfg.model).CONTEXT_FIELDS)
        cfg = with_parent_context(cfg, release)
        items = prompts(cfg)
        check_lengths(cfg, items)
        if info.is_main:
            print(f"{stage.name}: {len(items)} prompts, {cfg.prompts_per_step} x G = {cfg.group_size} completions a "
                  f"rollout, {cfg.updates_per_rollout} update(s) each, {cfg.train.steps} steps on {info.world_size} "
                  f"rank(s), {parallel_state.get_data_parallel_world_size()} data-parallel", flush=True)
        with stage.tracking(enabled=info.is_main) as mlflow_run:
            start = InitialWeights(parent["uri"], lambda: record_parent(stage, parent, release))
            metrics, logged = build_trainer(cfg, items, release, stage, info, start, mlflow_run)
            lineage = started_from(stage, parent, release)
            if mlflow_run:
                import mlflow

                mlflow.log_params({"grpo.prompts": len(items), "grpo.group_size": cfg.group_size,
                                   "grpo.prompts_per_step": cfg.prompts_per_step,
                                   "grpo.updates_per_rollout": cfg.updates_per_rollout, "grpo.beta": cfg.beta,
                                   "grpo.epsilon": cfg.epsilon, "grpo.format": cfg.format,
                                   "grpo.moe_router": cfg.moe_router})
                mlflow.set_tags({"seekflow.init_checkpoint": lineage["ref"], "seekflow.reference": lineage["ref"]})
            run_id = mlflow_run.info.run_id if mlflow_run else None
    outcome = trained_outcome(stage, metrics, run_id, parent=lineage)
    outcome.outputs["data"] = {"tasks": cfg.tasks.model_dump(), "prompts": len(items)}
    final = {name: logged[name] for name in FINAL_METRICS if name in logged and math.isfinite(logged[name])}
    outcome.metrics.update(final)
    outcome.result.update({name: final[name] for name in ("reward", "accuracy") if name in final})
    return outcome


def build_trainer(cfg: GrpoConfig, items: list, release, stage: StageRun, info, start, mlflow_run):
    """Train the GRPO module; returns (the trainer's metrics, the last step's metrics)."""
    from training.rl.grpo_module import GRPOTrainModule
    from training.train.callbacks import ExpertLoad
    from training.train.trainer import Callback, Trainer

    class LastStep(Callback):   # the last step's metrics, for the manifest
        def __init__(self):
            self.metrics = {}

        def post_step(self, trainer, metrics: dict) -> None:
            self.metrics = metrics

    reference = release if cfg.beta > 0 or cfg.track_kl else None
    module = GRPOTrainModule(cfg, info.device, items=items, reference=reference,
                             directory=stage.directory, label=stage.name)
    last = LastStep()
    trainer = Trainer(module, cfg.train, info, label=stage.name, directory=stage.directory, run_root=cfg.run_root,
                      init_weights=start, callbacks=[ExpertLoad(stage.directory / "expert_load_heatmap.png"), last])
    return trainer.fit(mlflow_run), last.metrics
