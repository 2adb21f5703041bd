"""GRPO's train module: the GPT train module whose batches are the policy's own rollouts (DeepSeekMath §4.1.2,
Algorithm 1; DeepSeek-R1 §2.2), in one process or data-parallel.

Every `updates_per_rollout` (μ) steps, before the step's update, `train_step` draws a rollout: `prompts_per_step`
prompts of the task suite's train split (a seeded permutation, walked in order) x G completions, sampled by the
policy itself through the KV-cache Generator over its own GPTModel (`chunks[0]`: π_θold is the policy at that moment,
training/rl/rollout.py), scored by the rule-based rewards, with group-relative advantages and the sampling policy's
log-probs; then the frozen reference's log-probs of the same tokens (a Generator over a second GPTModel loaded from
the initial release, `-token_nll`; none when beta is 0). `policy_samples` lays the rollout out as one global batch,
and the micro-batches are reopened over it at the current data position; the next μ steps are the ordinary megatron
step with `GRPOLoss`, each on the whole rollout.

Parallelism. With D data-parallel ranks, rank r samples the r-th D-th of the rollout's prompts, whole groups, with
those rows' own random streams (`row_seeds`), and scores them; the shares are then gathered, in rank order, so that
every rank holds the rollout one process would have drawn (up to the float sums of other generation batches), and
the micro-batches hand each rank its share of the update as in pretraining. Under pipeline and expert parallelism
the rollout decodes on this rank's shard of the policy (`chunks[0]`, the weights the update trains), every forward
spanning the model's ranks: the stages of a pipeline pass hidden states on and share the last stage's logits, and
expert-parallel ranks, which sample different prompts, decode in lockstep (training/eval/model_parallel.py). The
reference is loaded sharded the same way.

Resume. A rollout is a pure function of the weights and of the step it is drawn at (items by rollout index, sampling
seed `rollout_seed(seed, step)`), and the config puts every checkpoint on a rollout boundary (save_interval a
multiple of μ), so a resumed run redraws the rollout it stopped in from the restored weights, bit for bit, and no
rollout buffer is saved. The reference is the initial release, or, with `reference_reset_steps` N, the policy at the
last multiple of N: at each reset its weights are written to `reference/step_<N>.safetensors` under the stage (kept,
one model's weights per reset) and a resume loads the one it needs.

Router. `moe_router: bias_updates_off` sets the expert-bias update rate to 0 on every chunk's TransformerConfig
(megatron reads it in finalize_model_grads at each step); the router weights still train. `frozen` also keeps the
router weights as loaded (no gradient, no optimizer state). `as_trained` leaves both.

Metrics (each step's dict; a step carries the values of the rollout it trained on): reward and `reward/<name>`,
accuracy and format_rate (= reward/accuracy, reward/format), response_length, truncated_fraction,
zero_advantage_groups, rollout_tokens_per_s (response tokens sampled and scored per second of the rollout phase),
update_tokens_per_s (sequence positions of the update per second), sequence_length (the rollout's width, which
the update trains at), rollout (its index), with the loss's grpo_loss, kl and clip fraction.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from training.rl import rewards as R
from training.tokenizer import REASONING_OPENER
from training.rl.policy_loss import GRPOLoss, policy_samples
from training.eval.generate import row_seeds
from training.rl.rollout import Rollout, collect, concat, label_logp, rollout_seed, row_lengths
from training.train.gpt_module import GPTTrainModule

SAMPLE_ROWS = 8   # completions in each logged sample table


class InstructionTemplate:
    """DeepSeek-V3's chat template whose system message is trusted config text that may name the think tags: R1's
    R1-Zero instruction spells `<think> </think>`, special tokens that the template refuses in message text. The
    user's text is still checked."""

    def __init__(self, chat):
        self.chat = chat

    def prompt(self, messages) -> list[int]:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        ids = self.chat.prompt([m for m in messages if m.role != "system"])   # [BOS, user turn..., Assistant]
        instruction = self.chat.tokenizer.encode(system, add_special_tokens=False).ids if system else []
        return [ids[0], *instruction, *ids[1:]]


def is_router(name: str) -> bool:
    """The MoE routers' gate weights (megatron's `...mlp.router.weight`; the expert biases are buffers)."""
    return ".router." in name


class GRPOTrainModule(GPTTrainModule):
    """`cfg`: a GrpoConfig; `items`: the prompts (TaskItems); `reference`: the initial release (the KL reference;
    None when beta is 0); `directory`: the stage's local directory; `label`: what its log lines start with."""

    loss_name = "grpo_loss"
    progress_fields = (("reward", "reward"), ("accuracy", "acc"), ("kl", "kl"), ("mtp_loss", "mtp"))

    def __init__(self, cfg, device: torch.device, *, items: list, reference: Path | None, directory: Path,
                 label: str = "grpo"):
        from megatron.core import parallel_state

        from training.data.chat import ChatTemplate
        from training.eval.generate import Generator

        loss = GRPOLoss(epsilon=cfg.epsilon, beta=cfg.beta, aggregation=cfg.aggregation,
                        max_tokens=cfg.max_new_tokens)
        super().__init__(cfg, device, dataset=lambda num_samples: self.samples, loss=loss,
                         frozen=is_router if cfg.moe_router == "frozen" else None)
        self.items, self.label, self.directory = items, label, directory
        self.order = random.Random(cfg.seed).sample(range(len(items)), len(items))
        # pipeline / expert parallelism: the rollout decodes on this rank's shard, in step with the other ranks
        self.shard = {name: getattr(parallel_state, f"get_{name}_model_parallel_rank")()
                      for name in ("pipeline", "expert")}
        self.model_parallel = max(parallel_state.get_pipeline_model_parallel_world_size(),
                                  parallel_state.get_expert_model_parallel_world_size()) > 1
        self.generator = Generator(self.chunks[0], cfg.model.max_position_embeddings, cfg.generation_batch_size,
                                   vocab_merges=cfg.model.vocab_merges, model_parallel=self.model_parallel)
        self.template = InstructionTemplate(ChatTemplate(self.generator.tok))
        self.rewards = R.standard(cfg.format, cfg.language)
        self.weights = cfg.rewards.model_dump()
        self.reference_release, self.reference = reference, None
        self.samples, self.rollout, self.rollout_metrics = None, None, {}
        self.step, self.position = 0, 0
        self.dp_rank = parallel_state.get_data_parallel_rank()   # of self.dp_size (the stage checks they divide)
        self.is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if cfg.moe_router in ("bias_updates_off", "frozen"):
            for tconfig in self.tconfigs:
                tconfig.moe_router_bias_update_rate = 0.0

    # -- data --------------------------------------------------------------------------------------------------------
    def start(self, step: int, consumed_samples: int) -> list[str]:
        """Remember the position; the batches open over the first rollout, drawn by the first step."""
        self.step, self.position, self.chunk_batches, self.samples = step, consumed_samples, None, None
        if self.reference_release is not None:   # beta > 0, or track_kl
            self.reference = self._reference_at(step)
        return []

    @property
    def consumed_samples(self) -> int:
        return self.batches.consumed_samples if self.chunk_batches else self.position

    def rollout_items(self, index: int) -> list:
        """The prompts of rollout `index`: the next prompts_per_step of the seeded permutation, wrapping around."""
        n, per = len(self.items), self.cfg.prompts_per_step
        return [self.items[self.order[(index * per + k) % n]] for k in range(per)]

    # -- one step ----------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        if self.step % cfg.updates_per_rollout == 0 or self.samples is None:
            self.draw_rollout()
        started = time.perf_counter()
        metrics = super().train_step()
        update_s = time.perf_counter() - started
        self.step += 1
        metrics.update(self.rollout_metrics, update_tokens_per_s=len(self.samples) * self.seq_length / update_s,
                       sequence_length=float(self.seq_length))
        metrics["seconds/update"] = update_s   # with the rollout's seconds/<phase>: where a step's time goes
        return metrics

    def draw_rollout(self) -> Rollout:
        """The rollout of the current step, its reference log-probs, and the batches reopened over it."""
        cfg, index = self.cfg, self.step // self.cfg.updates_per_rollout
        resets = self.reference is not None and cfg.reference_reset_steps
        if resets and self.step and self.step % cfg.reference_reset_steps == 0:
            self._reset_reference()
        started = time.perf_counter()
        # this rank's share: whole groups, each row with the stream it has in the whole rollout
        items, rank, ranks = self.rollout_items(index), self.dp_rank, self.dp_size
        share, rows = len(items) // ranks, len(items) // ranks * cfg.group_size
        seed = rollout_seed(cfg.seed, self.step)
        rollout = collect(self.generator, items[rank * share:(rank + 1) * share], group_size=cfg.group_size,
                          rewards=self.rewards, weights=self.weights, max_new_tokens=cfg.max_new_tokens, seed=seed,
                          temperature=cfg.temperature, top_p=cfg.top_p, system_prompt=cfg.system_prompt,
                          reply_prefix=REASONING_OPENER if cfg.format == "r1" else "", scale_by_std=cfg.scale_by_std,
                          template=self.template,
                          row_seeds=row_seeds(seed, len(items) * cfg.group_size)[rank * rows:(rank + 1) * rows])
        sampled = time.perf_counter()
        ref_logp = self._reference_logp(rollout) if self.reference is not None else None
        referenced = time.perf_counter()
        if ranks > 1:
            rollout, ref_logp = self._gather(rollout, ref_logp)
        seconds = time.perf_counter() - started
        width = rollout.tokens.shape[1] - 1   # checked on the whole rollout: every rank raises, none waits
        if width > cfg.train.seq_length:
            raise ValueError(f"a rollout needs {width} positions, more than train.seq_length ({cfg.train.seq_length})"
                             f": raise it or shorten max_new_tokens / system_prompt")
        # Trained at the rollout's own width, not padded to train.seq_length: padding is compute the update throws
        # away (at the tiny preset's 192, two thirds of it). Every rank holds the whole rollout, so the pipeline's
        # stages agree on the width of the activations they exchange.
        self.seq_length = width
        self.samples = policy_samples(rollout, seq_length=width, global_batch_size=cfg.train.global_batch_size,
                                      ref_logp=ref_logp)
        position = self.consumed_samples
        super().start(self.step, position)   # micro-batches over the rollout, at the data position
        stats = rollout.stats
        response_tokens = int(rollout.response_mask.sum())
        self.rollout, self.rollout_metrics = rollout, {
            **stats, "accuracy": stats["reward/accuracy"], "format_rate": stats["reward/format"],
            "rollout_tokens_per_s": response_tokens / seconds, "rollout": float(index),
            "seconds/reference": referenced - sampled, "seconds/gather": started + seconds - referenced}
        last = self.step + cfg.updates_per_rollout
        if self.is_main:   # one report of the whole rollout
            print(f"{self.label}: rollout {index} for steps {self.step + 1}-{last}: reward {stats['reward']:.4f} "
                  f"accuracy {stats['reward/accuracy']:.4f} format {stats['reward/format']:.4f} "
                  f"zero-advantage groups {stats['zero_advantage_groups']:.2f}, {len(rollout)} completions, "
                  f"{response_tokens} tokens in {seconds:.1f}s", flush=True)
        if cfg.log_samples_interval and index % cfg.log_samples_interval == 0:
            log_samples(rollout, self.rollout_items(index), f"grpo/samples_step_{self.step:06d}.json")
        return rollout

    @staticmethod
    def _gather(rollout: Rollout, ref_logp: torch.Tensor | None) -> tuple[Rollout, torch.Tensor | None]:
        """Every data-parallel rank's share of the rollout, joined in rank order, on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
        shares: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(shares, (rollout, ref_logp), group=group)
        return concat([r for r, _ in shares], [ref for _, ref in shares])

    # -- the reference policy ----------------------------------------------------------------------------------------
    def _reference_logp(self, rollout: Rollout) -> torch.Tensor:
        lengths = row_lengths(rollout.prompt_lengths, rollout.response_mask)
        return label_logp(self.reference, rollout.tokens, rollout.response_mask, lengths).clone()

    def _reference_at(self, step: int):
        """A Generator over the reference in force at `step`: the initial release, or the last reset's weights."""
        from training.eval.generate import Generator
        from training.model.release import load_release

        gpt, model = load_release(self.reference_release, self.cfg.parallel)   # sharded as the policy is
        gpt.to(self.device)
        gpt.requires_grad_(False)
        every = self.cfg.reference_reset_steps   # a step on a reset redraws with a fresh reset: the one before
        last_reset = max(step - 1, 0) // every * every if every else 0
        if last_reset:
            from safetensors.torch import load_file

            state = load_file(self._reference_file(last_reset))
            missing, unexpected = gpt.load_state_dict(state, strict=False)
            if unexpected or any(not key.endswith("_extra_state") for key in missing):
                raise ValueError(f"reference weights of step {last_reset} do not fit the model: missing "
                                 f"{missing[:4]}, unexpected {unexpected[:4]}")
        return Generator(gpt, model.max_position_embeddings, self.cfg.generation_batch_size,
                         vocab_merges=model.vocab_merges, model_parallel=self.model_parallel)

    def _reference_file(self, step: int) -> Path:
        """The reset reference's weights of this rank's shard (one file per pipeline stage and expert shard)."""
        shard = "".join(f".{name[0]}p{rank}" for name, rank in self.shard.items()) if self.model_parallel else ""
        return self.directory / "reference" / f"step_{step:06d}{shard}.safetensors"

    def _reset_reference(self) -> None:
        """The reference becomes the current policy (R1-Zero: every 400 steps); its weights are kept for a resume."""
        from safetensors.torch import save_file

        state = {key: value.detach().clone() for key, value in self.chunks[0].state_dict().items()
                 if isinstance(value, torch.Tensor)}
        self.reference.gpt.load_state_dict(state, strict=False)
        path = self._reference_file(self.step)
        # Every rank writes its shard (data-parallel replicas the same bytes, each through its own partial file): a
        # resume on any node, whether the stage directory is shared or node-local, finds the file it needs.
        path.parent.mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        partial = path.with_suffix(f".partial{rank}")
        save_file({key: value.contiguous() for key, value in state.items()}, str(partial))
        partial.replace(path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        print(f"{self.label}: the reference is now the policy of step {self.step}", flush=True)


def log_samples(rollout: Rollout, items: list, artifact: str) -> None:
    """A table of the rollout's first completions with their prompt, rewards and stop reason, to the active MLflow
    run (rank 0's; nothing without one)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    rows = range(min(SAMPLE_ROWS, len(rollout)))
    table = {"prompt": [items[rollout.prompt_index[i]].prompt for i in rows],
             "completion": [rollout.completions[i] for i in rows],
             "reward": [float(rollout.rewards.view(-1)[i]) for i in rows],
             "advantage": [float(rollout.advantages[i]) for i in rows],
             "stop_reason": [rollout.stop_reasons[i] for i in rows],
             **{name: [scores[i] for i in rows] for name, scores in rollout.scores.items()}}
    mlflow.log_table(data=table, artifact_file=artifact)
