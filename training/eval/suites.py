"""Each evaluation suite end to end against a `Generator`: build the items, decode, score.

A suite returns a `SuiteResult`: its metrics (flat name -> float, logged as `eval/<suite>/<name>`), one record per
item with the same columns for every suite (suite, id, correct, prediction, target, status, reason), so all items fit
one table, and any tables and files of its own (paths under `eval/`: the needle-in-a-haystack grid and heatmap, the
perplexity-by-position table). `context_problems` names settings that cannot fit the model's context, so the stage
can refuse them before loading anything.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from training import benchmarks_data
from training.config import EvaluateConfig, ModelConfig
from training.data.chat import ChatTemplate, Message
from training.eval import arith, fim, heldout, humaneval, niah, passkey, perplexity
from training.eval.generate import Generator
from training.verify import tasks
from training.verify.sandbox import Limits

FIM_SPECIAL_TOKENS = 3          # <｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>


@dataclass
class SuiteResult:
    metrics: dict[str, float]
    items: list[dict] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)   # artifact path -> column -> values
    files: dict[str, bytes] = field(default_factory=dict)              # artifact path -> content (PNG)


def item(suite: str, id_: str, correct: bool, prediction: str, target: str = "", status: str = "",
         reason: str = "") -> dict:
    return {"suite": suite, "id": id_, "correct": bool(correct), "prediction": prediction, "target": target,
            "status": status or ("passed" if correct else "failed"), "reason": reason}


def context_problems(cfg: EvaluateConfig, model: ModelConfig) -> list[str]:
    """Settings whose prompts + generations exceed the model's max_position_embeddings (empty when all fit)."""
    limit, bad = model.max_position_embeddings, []
    if cfg.passkey.enabled and max(cfg.passkey.context_lengths) + cfg.passkey.max_new_tokens > limit:
        bad.append(f"passkey.context_lengths {cfg.passkey.context_lengths} + max_new_tokens "
                   f"{cfg.passkey.max_new_tokens} exceed the model's max_position_embeddings {limit}")
    # A window's seq_length predictions come from positions 0..seq_length-1, as in training; its last token is an
    # input nobody attends to (causal), so it needs no position of its own.
    p = cfg.perplexity
    if p.enabled and p.seq_length > limit and not p.allow_beyond_max_positions:
        bad.append(f"perplexity.seq_length {p.seq_length} exceeds max_position_embeddings {limit} (set "
                   f"perplexity.allow_beyond_max_positions to score beyond it)")
    f = cfg.fim
    if f.enabled and FIM_SPECIAL_TOKENS + f.max_prefix_tokens + f.max_suffix_tokens + f.max_new_tokens > limit:
        bad.append(f"fim prompt budget (max_prefix_tokens + max_suffix_tokens + max_new_tokens + 3) exceeds "
                   f"max_position_embeddings {limit}")
    for name in ("humaneval", "arith"):
        section = getattr(cfg, name)
        if section.enabled and section.max_new_tokens >= limit:
            bad.append(f"{name}.max_new_tokens {section.max_new_tokens} leaves no room for a prompt in {limit}")
    return bad


def run_humaneval(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    s = cfg.humaneval
    problems = benchmarks_data.load_humaneval_problems(s.max_problems)
    room = gen.max_positions - s.max_new_tokens
    prompts, truncated = [], 0
    for p in problems:
        ids = gen.encode(p["prompt"])
        truncated += len(ids) > room
        prompts.append(ids[-room:])            # keep the signature and docstring nearest the body
    samples: list[list[str]] = [[] for _ in problems]
    for j in range(s.samples_per_problem):
        outs = gen.generate(prompts, s.max_new_tokens, stop=humaneval.STOP_SEQUENCES, temperature=s.temperature,
                            seed=cfg.seed + j)
        for i, out in enumerate(outs):
            samples[i].append(humaneval.truncate(out.text))
    limits = Limits(wall_s=s.timeout_s, cpu_s=s.cpu_s, memory_mb=s.memory_mb)
    results = humaneval.execute(problems, samples, limits, workers=s.workers)
    metrics = {**humaneval.score(results, s.ks), "truncated_prompts": float(truncated)}
    items = [item("humaneval", f"{r.task_id}#{r.sample}", r.outcome.status == "passed", r.completion,
                  status=r.outcome.status, reason=r.outcome.reason) for r in results]
    return SuiteResult(metrics, items)


def run_fim(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    s = cfg.fim
    spans = fim.draw_items(s.num_spans, cfg.seed, s.context_lines)
    prompts = [fim.prompt_ids(x, gen.encode, s.max_prefix_tokens, s.max_suffix_tokens) for x in spans]
    outs = gen.generate(prompts, s.max_new_tokens, stop=("\n",))
    predictions = [o.text for o in outs]
    items = [item("fim", x.id, fim.exact_match(p, x.middle), fim.prediction(p), x.middle)
             for p, x in zip(predictions, spans)]
    return SuiteResult(fim.score(predictions, spans), items)


def run_passkey(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    s = cfg.passkey
    cells = benchmarks_data.draw_passkey_items(gen.encode, s.context_lengths, s.depths, s.trials, cfg.seed)
    outs = gen.generate([list(x.prompt_ids) for x in cells], s.max_new_tokens)
    texts = [o.text for o in outs]
    hits = [passkey.hit(t, x.key) for t, x in zip(texts, cells)]
    items = [item("passkey", x.id, h, t, x.key) for h, t, x in zip(hits, texts, cells)]
    grid = niah.grid(hits, cells)
    return SuiteResult({**passkey.score(texts, cells), **niah.depth_metrics(grid)}, items,
                       tables={"niah/grid.json": niah.table(grid)}, files={"niah/heatmap.png": niah.heatmap_png(grid)})


def run_arith(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    problems, shots = benchmarks_data.evaluation_arith_items(cfg.arith, cfg.seed)
    prompts = [gen.encode(benchmarks_data.arith_prompt(x, shots)) for x in problems]
    outs = gen.generate(prompts, cfg.arith.max_new_tokens, stop=("\n",))
    texts = [o.text for o in outs]
    items = [item("arith", x.id, arith.extract_answer(t) == x.answer, t, str(x.answer))
             for t, x in zip(texts, problems)]
    return SuiteResult(arith.score(texts, problems), items)


def run_perplexity(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    s = cfg.perplexity
    metrics: dict[str, float] = {}
    edges = perplexity.bucket_edges(s.seq_length, s.position_buckets) if s.position_buckets else None
    pooled = perplexity.PositionBuckets(edges) if edges else None
    rows: list[tuple[str, perplexity.PositionBuckets]] = []
    for source in s.sources:
        docs = (heldout.docstrings if source == "stdlib_docstrings" else heldout.code_files)(cfg.seed, s.max_documents)
        streams = (gen.encode(text) for _, text in docs)
        token_windows = perplexity.windows(streams, s.seq_length, s.max_tokens, eod_id=gen.eod_id)
        positions = perplexity.PositionBuckets(edges) if edges else None
        acc = perplexity.evaluate(gen.token_nll, token_windows, batch_size=cfg.batch_size, pad_id=gen.pad_id,
                                  positions=positions)
        metrics.update({source: acc.perplexity, f"{source}_nll": acc.mean_nll,
                        f"{source}_tokens": float(acc.tokens), f"{source}_documents": float(len(docs))})
        if positions is not None:
            metrics.update(positions.metrics(prefix=f"{source}_"))
            pooled.merge(positions)
            rows.append((source, positions))
    if pooled is None:
        return SuiteResult(metrics)
    metrics.update(pooled.metrics())   # pos_<a>_<b>: every source's tokens together
    rows.append(("all", pooled))
    cells = [(source, start, end, acc) for source, buckets in rows
             for acc, start, end in zip(buckets.buckets, edges, edges[1:])]
    table = {"source": [c[0] for c in cells], "bucket": [perplexity.bucket_name(c[1], c[2]) for c in cells],
             "start": [c[1] for c in cells], "end": [c[2] for c in cells], "tokens": [c[3].tokens for c in cells],
             "nll": [c[3].mean_nll for c in cells], "perplexity": [c[3].perplexity for c in cells]}
    return SuiteResult(metrics, tables={"perplexity/positions.json": table})


def run_tasks(cfg: EvaluateConfig, gen: Generator) -> SuiteResult:
    """The task suite's held-out split: chat-template prompts, greedy replies, exact checkers."""
    s = cfg.tasks
    template = ChatTemplate(gen.tok)
    metrics, items = {}, []
    for task in s.tasks:
        cases = tasks.generate(task, "heldout", s.heldout_items, seed=s.seed)
        prompts = [template.prompt([Message("user", x.prompt)]) for x in cases]
        texts = [o.text for o in gen.generate(prompts, s.max_new_tokens)]   # a reply ends at end-of-sentence
        if task == "code":
            hits = tasks.check_code_many(cases, texts)
        else:
            hits = [tasks.check(x, t) for x, t in zip(cases, texts)]
        metrics[f"{task}_accuracy"] = sum(hits) / len(hits)
        items += [item("tasks", x.id, h, t, x.answer) for x, h, t in zip(cases, hits, texts)]
    metrics["accuracy"] = sum(r["correct"] for r in items) / len(items)
    metrics["items"] = float(len(items))
    return SuiteResult(metrics, items)


SUITES = {"humaneval": run_humaneval, "fim": run_fim, "passkey": run_passkey, "arith": run_arith,
          "perplexity": run_perplexity, "tasks": run_tasks}


def run_enabled(cfg: EvaluateConfig, gen: Generator, log=print) -> dict[str, SuiteResult]:
    """Every enabled suite in a fixed order, each timed (`seconds` joins its metrics)."""
    results = {}
    for name, suite in SUITES.items():
        if not getattr(cfg, name).enabled:
            continue
        started = time.time()
        result = suite(cfg, gen)
        result.metrics["seconds"] = round(time.time() - started, 2)
        log(f"evaluate {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
        results[name] = result
    return results
