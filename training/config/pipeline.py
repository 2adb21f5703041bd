"""The stage registry and the pipeline config built from it.

`STAGES` is the one list of stage kinds, in pipeline order. `PipelineConfig` gets one section per registered kind
(`pretrain.train.steps`, `register.alias`, ...), so adding a stage means one config module with a `stage_spec`, one
entry below, a stage module `training.stages.<kind>`, a DAG file and preset entries.

A pipeline document may also hold further instances of a kind: a top-level section whose value has `stage: <kind>`,
e.g. `pretrain_more: {stage: pretrain, init_checkpoint: ..., train: {steps: 4}}`. It is validated by that kind's
config, gets the shared fields like every section, is named by its key (`cfg.stage_name == "pretrain_more"`) and so
runs in its own directory `{run_root}/pretrain_more/`.
"""
from __future__ import annotations

import copy
import typing
import warnings
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, create_model
from pydantic import model_validator
from pydantic_core import PydanticCustomError

from training.config.base import SHARED_KEYS, Section, StageConfig, TrackingConfig, deep_merge
from training.config.code_cpt import CodeCptConfig
from training.config.compress import CompressConfig
from training.config.curate import CurateConfig
from training.config.distill import DistillConfig
from training.config.evaluate import EvaluateConfig
from training.config.grpo import GrpoConfig
from training.config.long_context import LongContextConfig
from training.config.pretrain import PretrainConfig
from training.config.registry import PromoteConfig, RegisterConfig
from training.config.sft import SftConfig

# The stage registry: kind -> config class, in the order the pipeline runs them.
STAGES: dict[str, type[StageConfig]] = {cls.stage_spec.kind: cls for cls in (
    CurateConfig,
    PretrainConfig,
    EvaluateConfig,
    RegisterConfig,
    PromoteConfig,
    CodeCptConfig,
    LongContextConfig,
    SftConfig,
    DistillConfig,
    GrpoConfig,
    CompressConfig,
)}




def _gated(trained: str) -> dict[str, dict]:
    """evaluate → register → promote instances for the release of training stage instance `trained`: each reads
    the instance before it in place of its kind's default upstream."""
    return {f"evaluate_{trained}": {"stage": "evaluate", "reads": {"pretrain": trained}},
            f"register_{trained}": {"stage": "register",
                                    "reads": {"pretrain": trained, "evaluate": f"evaluate_{trained}"}},
            f"promote_{trained}": {"stage": "promote", "reads": {"register": f"register_{trained}"}}}


# What every pipeline document starts from (a preset's section of the same name goes on top): the code corpus that
# code continued pretraining reads (a preset gives its code source fim.rate); context extension of the code model
# (DeepSeek-Coder-V2; V3 §4.3 extends the pretrained base instead: set long_context.init_checkpoint); and the gated
# release of each later training stage.
CHAIN_INSTANCES: dict[str, dict] = {"curate_code": {"stage": "curate"}, **_gated("code_cpt"),
                                    "long_context": {"reads": {"pretrain": "code_cpt"}}, **_gated("long_context"),
                                    # V3 §5 fine-tunes the context-extended model (§4.3 comes first)
                                    "sft": {"reads": {"pretrain": "long_context"}}, **_gated("sft"),
                                    **_gated("distill"), **_gated("compress")}
# The post-training gates (V3 §5.1 fine-tunes for the tasks it evaluates; R1 §2.4 scores its students on the same
# benchmarks): the sft release and the distilled student are scored on the task suite's held-out split only, and
# promoted when their accuracy is not worse than their champion's.
_TASKS_ONLY = {suite: {"enabled": False} for suite in ("humaneval", "fim", "passkey", "arith", "perplexity")}
for _trained in ("sft", "distill", "compress"):
    CHAIN_INSTANCES[f"evaluate_{_trained}"].update(_TASKS_ONLY, tasks={"enabled": True})
    CHAIN_INSTANCES[f"promote_{_trained}"]["gates"] = [{"metric": "tasks.accuracy", "higher_is_better": True,
                                                        "max_regression": 0.02, "min": 0.0, "max": 1.0}]
# A student is a model of its own (R1 §2.4's DeepSeek-R1-Distill-*), with its own versions and champion: a dense
# student never replaces the MoE model it learnt from. Its parent tag names the teacher's model and version.
CHAIN_INSTANCES["register_distill"]["model_name"] = "seekflow-{profile}-student"
# A pruned model is a model of its own too: its champion is the best sparse version, never the dense one.
CHAIN_INSTANCES["register_compress"]["model_name"] = "seekflow-{profile}-sparse"

# DeepSeek-R1's recipe (§2.3), seekflow_post_train's `r1`: four training steps, each a stage instance whose release is
# scored on the held-out tasks and registered as a version of seekflow-<profile> with the step before it as parent;
# the last is gated for promotion. Reasoning replies are scored with room to reason (a preset may lower it).
R1_STEPS: dict[str, dict] = {
    # §2.3.1 cold start: the model sft would fine-tune (its input), on records written as reasoning turns
    "sft_cold_start": {"stage": "sft", "reasoning": True},
    # §2.3.2 reasoning-oriented RL in R1's <think> format; language consistency summed directly with accuracy
    "grpo_reasoning": {"stage": "grpo", "reads": {"pretrain": "sft_cold_start"}, "format": "r1",
                       "system_prompt": None, "rewards": {"language": 1.0}},
    # §2.3.3 rejection sampling + SFT: the policy samples, the correct replies (and a third as many direct answers,
    # the non-reasoning data) fine-tune it; R1 restarts from V3-Base there, the recipe continues the policy
    "sft_rejection": {"stage": "distill", "reads": {"sft": "grpo_reasoning"}, "student": "teacher",
                      "reasoning": True, "non_reasoning_share": 1 / 3},
    # §2.3.4 RL for all scenarios (rule rewards only: no reward model here)
    "grpo_all": {"stage": "grpo", "reads": {"pretrain": "sft_rejection"}, "format": "r1", "system_prompt": None},
}
_R1_GATES = {step: {name: section for name, section in _gated(step).items()   # promotion after the last step only
                    if not name.startswith("promote_") or step == "grpo_all"} for step in R1_STEPS}
for _trained, _gates in _R1_GATES.items():
    CHAIN_INSTANCES.update({_trained: R1_STEPS[_trained], **_gates})
    CHAIN_INSTANCES[f"evaluate_{_trained}"].update(_TASKS_ONLY, tasks={"enabled": True, "max_new_tokens": 1024})
CHAIN_INSTANCES["promote_grpo_all"]["gates"] = CHAIN_INSTANCES["promote_sft"]["gates"]

# What seekflow_post_train (per recipe) and seekflow_distill run, in order.
POST_TRAIN_CHAIN: tuple[str, ...] = ("sft", *_gated("sft"))
R1_CHAIN: tuple[str, ...] = tuple(name for step, gates in _R1_GATES.items() for name in (step, *gates))
RECIPES: dict[str, tuple[str, ...]] = {"sft": POST_TRAIN_CHAIN, "r1": R1_CHAIN}
DISTILL_CHAIN: tuple[str, ...] = ("distill", *_gated("distill"))
COMPRESS_CHAIN: tuple[str, ...] = ("compress", *_gated("compress"))

# The end-to-end pipeline's stage instances, in the order seekflow_pipeline runs them (DeepSeek-Coder-V2's line:
# pretrain, then code continued pretraining with FIM, then YaRN context extension; then supervised fine-tuning, V3 §5;
# every release evaluated, registered with its parent and gated for promotion). A kind in STAGES joins the pipeline
# only when listed here.
PIPELINE_CHAIN: tuple[str, ...] = (
    "curate", "pretrain", "evaluate", "register", "promote",
    "curate_code", "code_cpt", *_gated("code_cpt"),
    "long_context", *_gated("long_context"),
    "sft", *_gated("sft"),
)


def chain_kind(name: str) -> str:
    """The stage kind of a pipeline chain instance (`evaluate_code_cpt` -> `evaluate`)."""
    return name if name in STAGES else CHAIN_INSTANCES[name]["stage"]


def field_error(loc: tuple[str, ...], message: str, value: Any) -> ValidationError:
    """A validation error at `loc`; raised inside a validator, pydantic prefixes the validator's own location."""
    error = PydanticCustomError("value_error", message.replace("{", "{{").replace("}", "}}"))
    return ValidationError.from_exception_data("config", [{"type": error, "loc": loc, "input": value}])


def _validate_instance(section: Any) -> StageConfig:
    """A further stage instance: a section with `stage: <kind>`, validated by that kind's config."""
    if isinstance(section, StageConfig):
        return section
    if not isinstance(section, dict) or "stage" not in section:
        raise PydanticCustomError("extra_forbidden", "not a pipeline field; a further stage instance is a section "
                                                     "with `stage: <kind>`")
    body = dict(section)
    kind = body.pop("stage")
    if kind not in STAGES:
        raise field_error(("stage",), f"unknown stage kind {kind!r}; choose one of: {', '.join(STAGES)}", kind)
    return STAGES[kind].model_validate(body)


def instance_section(pipeline_doc: dict, name: str) -> dict:
    """The section of stage instance `name` in a pipeline document, before the shared fields. A further instance
    starts from its kind's section and puts its own keys on top (a second pretrain trains the same model unless it
    says otherwise), keeps its `stage` key and is named by its key."""
    own = dict(pipeline_doc.get(name) or {})
    if name in STAGES or not isinstance(own.get("stage"), str):
        return own
    base = pipeline_doc.get(own["stage"]) if own["stage"] in STAGES else None
    section = deep_merge(copy.deepcopy(base) if isinstance(base, dict) else {}, own)
    section["name"] = own.get("name", name)
    return section


def _dump_instance(cfg: StageConfig, info) -> dict:
    return {"stage": cfg.stage_spec.kind, **cfg.model_dump(mode=info.mode, by_alias=info.by_alias)}


StageInstance = Annotated[StageConfig, PlainValidator(_validate_instance), PlainSerializer(_dump_instance)]


class PipelineShape(Section):
    """What every pipeline has besides its stage sections: the shared fields and the further stage instances."""

    model_config = ConfigDict(extra="allow")   # further instances only: each is validated as a StageInstance
    __pydantic_extra__: dict[str, StageInstance] = Field(init=False)

    profile: str = "tiny"
    run_root: str = "runs/default"
    seed: int = 1234
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def stage(self, name: str) -> StageConfig:
        """A stage instance by name: a registered kind (its default instance) or a further instance."""
        if name in STAGES:
            return getattr(self, name)
        extra = self.__pydantic_extra__ or {}
        if name not in extra:
            raise KeyError(f"no stage {name!r} in the pipeline; it has: {', '.join(n for n, _ in self.instances())}")
        return extra[name]

    def instances(self) -> list[tuple[str, StageConfig]]:
        """(name, config) of every stage instance, in pipeline order: each kind's default instance, then the further
        instances of that kind in document order."""
        extra = list((self.__pydantic_extra__ or {}).items())
        return [pair for kind in STAGES
                for pair in [(kind, getattr(self, kind))] + [(n, c) for n, c in extra if c.stage_spec.kind == kind]]

    @model_validator(mode="before")
    @classmethod
    def _share_common_fields(cls, data):
        """Shared fields go into every stage section before validation, so `pipeline.pretrain` is a complete
        `PretrainConfig`, exactly what `python -m training pretrain` receives."""
        if not isinstance(data, dict):
            return data
        shared = {k: data[k] for k in SHARED_KEYS if k in data}
        data = {**{name: deep_merge(copy.deepcopy(default), data.get(name) or {})
                   for name, default in CHAIN_INSTANCES.items()}, **{k: v for k, v in data.items()
                                                                     if k not in CHAIN_INSTANCES}}
        sections = {}
        for key, section in data.items():
            if key in STAGES and isinstance(section or {}, dict):
                sections[key] = {**shared, **(section or {})}
            elif key not in cls.model_fields and isinstance(section, dict) and "stage" in section:
                sections[key] = {**shared, **instance_section(data, key)}
        return {**{kind: dict(shared) for kind in STAGES}, **data, **sections}

    @model_validator(mode="after")
    def _named_by_key(self):
        for key, cfg in self.instances():
            if cfg.stage_name != key:
                raise field_error((key, "name"), f"a stage instance is named by its key in the pipeline ({key!r}), "
                                                 f"got {cfg.name!r}", cfg.name)
        return self


def _build_pipeline() -> type[PipelineShape]:
    sections = {kind: (cls, Field(default_factory=cls)) for kind, cls in STAGES.items()}
    with warnings.catch_warnings():
        # `register` is also ABCMeta.register, a method of the model *class*; instances and pydantic never use it,
        # so `pipeline.register` is the section, like every other stage.
        warnings.filterwarnings("ignore", message='Field name "register" .* shadows an attribute')
        return create_model(
            "PipelineConfig", __base__=PipelineShape, __module__=__name__,
            __doc__="The whole run: shared fields once, then one section per stage kind (and any further stage "
                    "instances). Presets are documents of this shape.",
            **sections)


PipelineConfig = _build_pipeline()


def _field_type(model: type[BaseModel], name: str) -> Any:
    annotation = model.model_fields[name].annotation
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return options[0] if len(options) == 1 else annotation


def registry_problems() -> list[str]:
    """What is wrong with a registered stage's `stage_spec` (the registry test asserts there is nothing)."""
    problems = []
    for position, (kind, cls) in enumerate(STAGES.items()):
        spec = cls.stage_spec
        if spec.kind != kind or "stage_spec" not in cls.__dict__:
            problems.append(f"{cls.__name__}: declares no stage_spec of its own for kind {kind!r}")
        if spec.launcher not in ("torchrun", "python") or (spec.gpus_per_node and spec.launcher != "torchrun"):
            problems.append(f"{kind}: launcher {spec.launcher!r} with gpus_per_node {spec.gpus_per_node}")
        if spec.shardable and "shards" not in cls.model_fields:
            problems.append(f"{kind}: shardable, but its config has no `shards` field")
        for path in spec.form_fields + spec.input_fields:
            model: Any = cls
            for part in path.split("."):
                if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
                    problems.append(f"{kind}: no field {path!r}")
                    break
                model = _field_type(model, part)
        for upstream in spec.upstream:
            if upstream not in list(STAGES)[:position]:
                problems.append(f"{kind}: reads {upstream!r}, which is not a stage registered before it")
    return problems
