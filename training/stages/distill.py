"""The `distill` stage: a teacher's reasoning traces, rejection-sampled on the task suite, fine-tune a dense student
(DeepSeek-R1 §2.4: "we directly fine-tuned open-source models ... using the 800k samples curated with DeepSeek-R1",
sampled as in §2.3.3, "retain only the correct ones"; SFT only, no RL stage for the students).

config -> traces (every rank loads a whole teacher and samples `samples_per_prompt` completions for its share of the
task suite's train prompts; the task checkers keep the correct ones: training/data/traces.py) -> data (the kept
traces as conversation records, packed as sft packs them) + loss (sft's: assistant tokens only) -> trainer, on the
student's own layout and from its own start (`init_checkpoint`, or a random init).

The traces are text in the chat template's form, so the student re-encodes them with its own vocabulary, as R1's
students (Qwen, Llama) read R1's text with their own tokenizers. They are written once, summary last
(`traces/traces.jsonl`, samples of the rejected completions in `traces/rejected.jsonl`, `traces/summary.json`); a
retry reuses them and resumes the student from its checkpoint. The manifest names the teacher as the parent
(`outputs.parent`, which register turns into `seekflow.parent_version`), the trace dataset (`outputs.data`: URI,
sha256, counts, rejection rate) and the student's start (`outputs.init_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
import time

from training import integrity, registry, storage
from training.config import ParallelConfig
from training.config.distill import DistillConfig
from training.data import traces as T
from training.parallel.setup import distributed, init_distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.stages.parent import fetch_parent, pin_parent, record_parent, started_from
from training.stages.pretrain import trained_outcome
from training.stages.sft import build_trainer, pack_conversations, with_epoch_steps
from training.tokenizer import REASONING_OPENER
from training.tracking import tracking_uri
from training.verify import tasks

# Under the stage: the kept traces, samples of the rejected completions, and the summary (written last).
TRACES, REJECTED, SUMMARY = "traces/traces.jsonl", "traces/rejected.jsonl", "traces/summary.json"


class DistillError(ValueError):
    """A teacher that is not there, or traces with nothing to learn: bad input, named by field; not retried."""

    permanent = True


def run(cfg: DistillConfig) -> dict | None:
    teacher = pin_teacher(cfg)
    if cfg.student == "teacher":   # R1 §2.3.3 as the r1 recipe runs it: the policy learns from its own kept samples
        base = teacher
    else:
        base = pin_parent(cfg) if cfg.init_checkpoint else None
    inputs = {"teacher": teacher["uri"], "init_checkpoint": base["uri"] if base else None}
    return run_stage(cfg, inputs, lambda stage: distill(cfg, teacher, base, stage))


def pin_teacher(cfg: DistillConfig) -> dict:
    """{ref, uri, model_name, version, manifest_hash}: the teacher, a registered one pinned to its version, checked
    to exist before anything runs."""
    teacher = pin_parent(cfg, field="teacher", upstream="sft", error=DistillError)
    if teacher["version"] is None and not storage.exists(storage.join(teacher["ref"], integrity.MARKER)):
        raise DistillError(f"teacher: no release at {teacher['ref']} (no {integrity.MARKER})")
    return teacher


def sampling(cfg: DistillConfig) -> dict:
    """What decides the traces besides the teacher: recorded with them, compared on reuse."""
    return {"tasks": cfg.tasks.model_dump(), **cfg.model_dump(include={
        "samples_per_prompt", "temperature", "top_p", "max_new_tokens", "seed", "reasoning",
        "non_reasoning_share"})}


def distill(cfg: DistillConfig, teacher: dict, base: dict | None, stage: StageRun) -> Outcome:
    from training.model.release import read_model_config
    from training.train.trainer import InitialWeights

    with distributed(ParallelConfig(), cfg.seed) as info:   # every rank a whole teacher: generation only
        traces = teacher_traces(cfg, teacher, stage, info)
        info = student_layout(cfg)
        if cfg.student == "teacher":   # the teacher's own architecture, whatever `model` says
            release = fetch_parent(cfg, base, stage, allowed=frozenset(type(cfg.model).model_fields))
            cfg = cfg.model_copy(update={"model": read_model_config(release)})
        else:
            release = fetch_parent(cfg, base, stage) if base else None
        packed, data = pack_conversations(cfg, traces["uri"], stage, generated=True)
        cfg = with_epoch_steps(cfg, len(packed))
        print(f"{stage.name}: {data['conversations']} traces in {len(packed)} sequences of {cfg.train.seq_length} "
              f"tokens; {cfg.train.steps} steps from {base['uri'] if base else 'a random init'}", flush=True)
        with stage.tracking(enabled=info.is_main) as mlflow_run:
            start = InitialWeights(base["uri"], lambda: record_parent(stage, base, release)) if base else None
            metrics = build_trainer(cfg, packed, stage, info, start).fit(mlflow_run)
            student_start = started_from(stage, base, release) if base else None
            if mlflow_run:
                log_lineage(traces, student_start)
            run_id = mlflow_run.info.run_id if mlflow_run else None
    counts = traces["selection"]
    outcome = trained_outcome(stage, metrics, run_id, parent=traces["teacher"])
    outcome.outputs.update(teacher=traces["teacher"], init_checkpoint=student_start, data={
        **data, "traces_sha256": traces["sha256"], "sampling": traces["sampling"], "traces": counts})
    outcome.metrics.update({"traces_kept": counts["kept"], "rejection_rate": counts["rejection_rate"]})
    outcome.result.update(teacher=traces["teacher"]["uri"], rejection_rate=counts["rejection_rate"])
    return outcome


def student_layout(cfg: DistillConfig):
    """megatron-core's groups for the student's `parallel` layout, on the processes that sampled the teacher (the
    torch process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return init_distributed(cfg.parallel, cfg.seed)


def teacher_traces(cfg: DistillConfig, teacher: dict, stage: StageRun, info) -> dict:
    """The summary of the stage's traces ({uri, sha256, teacher, sampling, selection}): those this run sampled
    before (a resumed student keeps the data it started on), else sampled now by every rank, written by rank 0."""
    import torch.distributed as dist

    summary_uri = storage.join(stage.uri, SUMMARY)
    recorded = storage.read_text(summary_uri)
    if recorded:
        summary = json.loads(recorded)
        if summary["teacher"]["uri"] != teacher["uri"] or summary["sampling"] != sampling(cfg):
            print(f"{stage.name}: warning: keeping the traces this run sampled from {summary['teacher']['uri']} "
                  f"with {summary['sampling']}; a new run_root samples {teacher['uri']} as configured now",
                  flush=True)
        print(f"{stage.name}: reusing {summary['selection']['kept']} traces at {summary['uri']}", flush=True)
        return summary
    try:
        release = registry.resolve_release_on_every_rank(teacher["uri"], tracking_uri=tracking_uri(cfg),
                                                         into=stage.directory / "teacher")
    except registry.RegistryError as err:
        raise registry.RegistryError(f"teacher {teacher['ref']}: {err}", permanent=err.permanent) from None
    lineage = {**teacher, "release_sha256": integrity.marker_digest(release)}
    started = time.time()
    items = [item for task in cfg.tasks.tasks
             for item in tasks.generate(task, "train", cfg.tasks.train_items, seed=cfg.tasks.seed)]
    mine = list(range(info.rank, len(items), info.world_size))
    sampled = sample_and_grade(cfg, release, [items[i] for i in mine], info)
    shares: list = [None] * info.world_size
    dist.all_gather_object(shares, (mine, *sampled))
    completions, verdicts = [None] * len(items), [None] * len(items)
    for indices, their_completions, their_verdicts in shares:
        for i, c, v in zip(indices, their_completions, their_verdicts):
            completions[i], verdicts[i] = c, v
    selection = T.select(items, completions, verdicts)
    counts = {**selection.summary(), "seconds": round(time.time() - started, 1)}
    print(f"{stage.name}: {counts['sampled']} completions from {teacher['uri']}: kept {counts['kept']} "
          f"({counts['duplicates']} duplicates, {counts['wrong']} wrong, {counts['unfinished']} unfinished; "
          f"rejection rate {counts['rejection_rate']:.1%})", flush=True)
    if not selection.records:   # every rank has the same selection: all raise together
        raise DistillError(f"teacher {teacher['ref']}: none of its {counts['sampled']} completions checks as "
                           f"correct ({counts['wrong']} wrong, {counts['unfinished']} unfinished within "
                           f"max_new_tokens {cfg.max_new_tokens}); there is nothing to distill")
    mixed = non_reasoning(cfg, len(selection.records))
    counts["non_reasoning"] = len(mixed)
    text = "".join(json.dumps(record) + "\n" for record in selection.records + mixed)
    summary = {"uri": storage.join(stage.uri, TRACES), "sha256": hashlib.sha256(text.encode()).hexdigest(),
               "teacher": lineage, "sampling": sampling(cfg), "selection": counts}
    if stage.writes:
        storage.write_text(summary["uri"], text)
        storage.write_text(storage.join(stage.uri, REJECTED), "".join(json.dumps(r) + "\n" for r in selection.rejected))
        storage.write_text(summary_uri, json.dumps(summary, indent=2))
    dist.barrier()   # the traces are on disk before any rank reads them
    return summary


def non_reasoning(cfg: DistillConfig, kept: int) -> list[dict]:
    """`non_reasoning_share` x `kept` direct-answer conversations (no <think>) of the task suite's train split, spread
    over its tasks: R1 §2.3.3 fine-tunes on reasoning and non-reasoning data together."""
    wanted = round(cfg.non_reasoning_share * kept)
    if not wanted:
        return []
    per_task = -(-wanted // len(cfg.tasks.tasks))
    drawn = [item.conversation() for task in cfg.tasks.tasks
             for item in tasks.generate(task, "train", per_task, seed=cfg.tasks.seed)]
    return drawn[:wanted]


def sample_and_grade(cfg: DistillConfig, release, items: list, info) -> tuple[list, list]:
    """([[Completion] per item], [[correct] per item]): `samples_per_prompt` sampled replies to each item's prompt
    in the chat template, from the teacher release (loaded on this rank, freed on return), and the checker's
    verdicts."""
    from training.data.chat import ChatTemplate, Message
    from training.eval.generate import Generator
    from training.model.release import load_release

    if not items:   # more ranks than prompts
        return [], []
    gpt, teacher_model = load_release(release)
    gpt.to(info.device)
    generator = Generator(gpt, teacher_model.max_position_embeddings, cfg.generation_batch_size,
                          vocab_merges=teacher_model.vocab_merges)
    template = ChatTemplate(generator.tok)
    k = cfg.samples_per_prompt
    repeated = [item for item in items for _ in range(k)]   # one sampling stream per copy of a prompt
    opener = REASONING_OPENER if cfg.reasoning else ""   # a reasoning teacher's reply opens inside <think>
    prefix = generator.encode(opener) if opener else []
    outs = generator.generate([template.prompt([Message("user", item.prompt)]) + prefix for item in repeated],
                              cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=cfg.seed + info.rank)
    texts = [opener + o.text for o in outs]
    verdicts = T.grade(repeated, texts)
    completions = [T.Completion(text, o.stop_reason) for text, o in zip(texts, outs)]
    return ([completions[i:i + k] for i in range(0, len(outs), k)], [verdicts[i:i + k] for i in range(0, len(outs), k)])


def log_lineage(traces: dict, student_start: dict | None) -> None:
    """The teacher, the trace dataset and the student's start on the student's MLflow run (rank 0)."""
    import mlflow

    counts = traces["selection"]
    mlflow.log_params({"distill.sampled": counts["sampled"], "distill.kept": counts["kept"],
                       "distill.rejection_rate": round(counts["rejection_rate"], 6)})
    mlflow.set_tags({"seekflow.teacher": traces["teacher"]["uri"], "seekflow.distill_data": traces["uri"],
                     "seekflow.distill_data_sha256": traces["sha256"],
                     "seekflow.init_checkpoint": student_start["ref"] if student_start else "random init"})
    mlflow.log_dict(traces, "distill/traces_summary.json")
