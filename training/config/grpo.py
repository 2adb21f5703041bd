"""The grpo stage's config: Group Relative Policy Optimization with rule-based rewards on the task suite,
DeepSeek-R1-Zero's recipe (DeepSeekMath §4.1; DeepSeek-R1 §2.2). Defaults are the papers' (training/rl/grpo_loss.py's
PRESETS, which say where each value comes from); a comment marks every value that is ours.

Router handling (`moe_router`): DeepSeek's papers say nothing about the aux-loss-free expert biases during RL. The
default keeps them as released: V3 §4.2 already ends pretraining with a bias update speed of 0, and a bias that drifts
between the rollout and its updates would move π_θ away from π_θold by something the gradient did not do. `frozen`
goes further and keeps the router weights too: megatron's DDP and optimizer skip parameters that require no
gradient, so they get neither gradient buffers nor optimizer state."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from training.config.base import Section, StageInput, StageSpec
from training.config.pretrain import TrainingConfig
from training.config.tasks import TaskSuiteConfig
from training.config.train import OptimizerConfig, TrainLoopConfig

R1_ZERO = {"lr": 3e-6, "beta": 0.001, "group_size": 16, "prompts_per_step": 32, "temperature": 1.0,
           "epsilon": 10.0}   # = grpo_loss.PRESETS["deepseek_r1_zero"] (batch 512 = 32 prompts x 16); kept in step
# by tests/training/stages/test_grpo_config.py (training.config must not import torch)

# DeepSeek-R1 Table 1's R1-Zero template, quoted from memory of the paper (not checked against the primary text
# when written). The paper's template is raw text ending "User: prompt. Assistant:"; here its instruction is the chat
# template's system message and the question the user turn (`<think>` and `</think>` are special tokens of
# DeepSeek's tokenizer: the rollout writes the system message with them, the user's text may not contain them).
R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.")

# The model-parallel sizes the rollout cannot decode under (training/eval/model_parallel.py): tensor parallelism
# (megatron needs sequence parallelism with MoE, which splits the one decoded position) and context parallelism split
# the sequence; virtual pipeline stages interleave chunks a decoding step does not walk.
_NOT_FOR_ROLLOUTS = ("tensor_model_parallel_size", "context_parallel_size", "virtual_pipeline_model_parallel_size")


class RewardWeights(Section):
    """Each rule-based reward's weight in the total (training/rl/rewards.py; R1 §2.2.2). All three are scored and
    logged (`reward/<name>`) whatever their weight."""

    # R1-Zero (§2.2.2) trains on accuracy and format; the paper gives no weights: 1 and 1 are ours.
    format: float = Field(1.0, ge=0, description="Format reward (the completion has the template's tags).")
    accuracy: float = Field(1.0, ge=0, description="Accuracy reward (the task suite's checker on the answer).")
    # R1 §2.3.2 adds language consistency, summed directly with accuracy, for DeepSeek-R1 (not R1-Zero): 0 here.
    language: float = Field(0.0, ge=0, description="Language-consistency reward (R1 §2.3.2: share of target-language "
                                                   "words in the reasoning); 0 in R1-Zero.")


class GrpoConfig(TrainingConfig):
    """Under torchrun, one process per GPU, data-, pipeline- and expert-parallel: every data-parallel rank samples its
    share of each rollout through the KV cache on its shard of the policy, a frozen reference scores them, and the
    policy is updated `updates_per_rollout` times on each whole rollout."""

    stage_spec: ClassVar[StageSpec] = StageSpec(
        # A retry resumes from the last checkpoint and redraws that step's rollout (rollout_seed): nothing else to keep.
        kind="grpo", launcher="torchrun", retries=3, retry_delay_minutes=5,   # one process per GPU
        timeout_minutes=24 * 60,
        # R1-Zero applies RL to the *base* model, with no SFT first (R1 §2.2): the pretrain stage's release.
        inputs=(StageInput("init_checkpoint", upstream="pretrain"),),
        form_fields=(
            "tasks.tasks", "tasks.train_items", "group_size", "prompts_per_step", "updates_per_rollout", "epsilon",
            "beta", "temperature", "max_new_tokens", "format", "reference_reset_steps",
            "train.steps", "train.seq_length", "train.micro_batch_size", "train.global_batch_size",
            "optimizer.lr",
        ))

    init_checkpoint: str | None = Field(
        None, min_length=1, description="The model to train: a release directory, an s3:// URI or a registered "
        "version (models:/name@alias, models:/name/version). Default: the pretrain stage's release under run_root "
        "(R1-Zero starts from the base model; point it at an sft release for R1's later RL stage). It is also the "
        "frozen reference policy of the KL term. `model` must be its architecture.")
    tasks: TaskSuiteConfig = Field(default_factory=TaskSuiteConfig,
                                   description="The prompts: the task suite's train split, with its checkers as the "
                                               "accuracy reward.")
    group_size: int = Field(R1_ZERO["group_size"], ge=2, description="G: completions sampled per prompt (R1-Zero: 16).")
    prompts_per_step: int = Field(R1_ZERO["prompts_per_step"], ge=1,
                                  description="Prompts per rollout (R1-Zero: 32 a step, batch 512).")
    updates_per_rollout: int = Field(
        1, ge=1, description="μ: optimizer steps on each rollout (DeepSeekMath Algorithm 1; §4.2 uses one). Each "
                             "takes the whole rollout as its global batch.")
    epsilon: float = Field(R1_ZERO["epsilon"], gt=0, description="Clip range ε of the ratio (see grpo_loss.PRESETS: "
                                                                 "R1-Zero's 10 is to be checked; PPO's is 0.2).")
    beta: float = Field(R1_ZERO["beta"], ge=0, description="KL coefficient β (R1-Zero: 0.001; DeepSeekMath: 0.04). "
                                                           "0: no reference model is loaded (see track_kl).")
    track_kl: bool = Field(False, description="With beta 0, still load the reference and log the KL to it (one more "
                                              "forward pass per rollout; the loss is unchanged). Always on when "
                                              "beta > 0.")
    aggregation: Literal["sequence", "token", "dr_grpo"] = Field(
        "sequence", description="How token terms average (grpo_loss.Aggregation): sequence (DeepSeekMath eq. 3), "
                                "token (DAPO), dr_grpo (Dr. GRPO, divides by max_new_tokens).")
    scale_by_std: bool = Field(True, description="Divide advantages by the group's std (False: Dr. GRPO).")
    temperature: float = Field(R1_ZERO["temperature"], gt=0, le=2, description="Sampling temperature (R1-Zero: 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus p (1: none; R1-Zero names none).")
    max_new_tokens: int = Field(
        1024, ge=1, description="Longest completion; a cut-off one has no EOS and usually no format reward "
        "(DeepSeekMath §4.2: max length 1024; R1-Zero allows 32,768, which needs a long-context model).")
    generation_batch_size: int = Field(64, ge=1, le=4096, description="Completions decoded together (ours).")
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    format: Literal["r1-zero", "r1"] = Field(
        "r1-zero", description="r1-zero: <think>...</think> <answer>...</answer> (R1 Table 1). r1: the reply starts "
                               "inside <think> (the prompt ends with it) and the answer follows </think>.")
    language: Literal["en", "zh"] = Field("en", description="The language-consistency reward's target language.")
    system_prompt: str | None = Field(
        R1_ZERO_INSTRUCTION, description="The instruction before each question (the chat template's system message); "
        "default: R1 Table 1's R1-Zero template. None: the question alone.")
    reference_reset_steps: int | None = Field(
        None, ge=1, description="Replace the reference by the current policy every this many steps (R1-Zero: every "
        "400). None: the reference stays the initial model (DeepSeekMath §4.1).")
    moe_router: Literal["bias_updates_off", "frozen", "as_trained"] = Field(
        "bias_updates_off", description="bias_updates_off: the aux-loss-free expert biases stay as released (V3 §4.2 "
        "ends pretraining with bias update speed 0), so routing changes only through the gradient of the GRPO loss "
        "and the ratio π_θ/π_θold measures that alone. frozen: the router weights stay as released too, so routing "
        "never drifts between rollout and update (what other Megatron-based RL trainers do). as_trained: the biases "
        "keep updating at model.moe_router_bias_update_rate, as in pretraining.")
    log_samples_interval: int | None = Field(
        10, ge=1, description="Every this many rollouts, a table of a few completions with their rewards to MLflow "
                              "(grpo/samples_step_<N>.json). None: never.")
    # R1-Zero's lr (Nature, Methods), constant: the paper names no schedule (ours: no warm-up, no decay).
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(
        decay_style="constant", lr=R1_ZERO["lr"], min_lr=R1_ZERO["lr"], warmup_steps=0))
    train: TrainLoopConfig = Field(default_factory=lambda: TrainLoopConfig(
        global_batch_size=R1_ZERO["prompts_per_step"] * R1_ZERO["group_size"], micro_batch_size=2,
        seq_length=2048))

    @model_validator(mode="after")
    def _check_grpo(self) -> "GrpoConfig":
        for name in _NOT_FOR_ROLLOUTS:
            size = getattr(self.parallel, name)
            if size is not None and size > 1:
                raise ValueError(f"parallel.{name} is {size}: grpo's rollouts decode under data, pipeline and expert "
                                 f"parallelism only; under this one they are not built (use 1)")
        rollout = self.prompts_per_step * self.group_size
        if self.train.global_batch_size != rollout:
            raise ValueError(f"train.global_batch_size ({self.train.global_batch_size}) must equal prompts_per_step "
                             f"x group_size ({self.prompts_per_step} x {self.group_size} = {rollout}): each update "
                             f"consumes one whole rollout")
        if self.train.save_interval % self.updates_per_rollout:
            raise ValueError(f"train.save_interval ({self.train.save_interval}) must be a multiple of "
                             f"updates_per_rollout ({self.updates_per_rollout}): a checkpoint never falls inside a "
                             f"rollout's updates, so a resume redraws the rollout from the restored weights")
        if self.train.steps % self.updates_per_rollout:
            raise ValueError(f"train.steps ({self.train.steps}) must be a multiple of updates_per_rollout "
                             f"({self.updates_per_rollout}): the last checkpoint ends a rollout's updates too")
        if self.reference_reset_steps is not None and self.reference_reset_steps % self.updates_per_rollout:
            raise ValueError(f"reference_reset_steps ({self.reference_reset_steps}) must be a multiple of "
                             f"updates_per_rollout ({self.updates_per_rollout}): the reference changes between "
                             f"rollouts")
        if self.max_new_tokens >= self.train.seq_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below train.seq_length "
                             f"({self.train.seq_length}): prompt and completion share one sequence")
        if self.train.batch_size_rampup is not None:
            raise ValueError("train.batch_size_rampup: grpo's batch is one rollout; a ramp is not supported")
        return self
