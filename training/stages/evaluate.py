"""The `evaluate` stage: score a release checkpoint on HumanEval, FIM, passkey, arithmetic and held-out perplexity.

Input is a release directory or a registered version (`models:/name@alias`, `models:/name/version`); default the
pretrain stage's release under run_root. Everything that can be checked without the model is checked first: the
tracking server answers, the reference resolves to a complete release (training.registry: RegistryError otherwise),
and the suites' prompts fit the model's context (EvaluateError). Only then is the model loaded (one process,
megatron-core GPTModel).

Results: metrics `eval/<suite>/<metric>` in one MLflow run, per-item results as an MLflow table
(`eval/items.json`) plus `eval/results.json`, `eval/summary.md` and `eval/summary.csv`, the suites' own tables and
files (`eval/niah/grid.json` + `eval/niah/heatmap.png`, `eval/perplexity/positions.json`), and, for a registered
version, `seekflow.eval.<suite>.<metric>` tags on that version. The manifest is written last.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from training import registry, storage
from training.config import EvaluateConfig, ParallelConfig
from training.eval import heldout
from training.manifest import read_manifest
from training.model.release import read_model_config
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.tracking import tracking_uri

HEADLINE = {"humaneval": "pass_at_1", "fim": "exact_match", "passkey": "accuracy", "arith": "accuracy"}


class EvaluateError(RuntimeError):
    """Settings the evaluate stage cannot run, found before any work (nothing written, nothing tagged)."""

    permanent = True   # bad input: the task is not retried


def run(cfg: EvaluateConfig) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EvaluateError("evaluate runs in one process; launch it without torchrun (nproc 1)")
    uri = tracking_uri(cfg)
    registry.check_tracking_server(uri)
    ref = cfg.checkpoint or read_manifest(storage.stage_uri(cfg.run_root, cfg.upstream("pretrain")))["outputs"]["release_checkpoint"]
    # The registry client is made only for a models:/ reference: opening a sqlite store creates it, and a bad local
    # checkpoint must fail before anything is written.
    downloads = storage.local_dir(cfg.run_root, create=False) / cfg.stage_name / "checkpoints"
    release = registry.resolve_release(ref, tracking_uri=uri, into=downloads)
    target = (registry.resolve_version(registry.mlflow_client(uri), cfg.model_version) if cfg.model_version
              else release.version)
    inputs = {"checkpoint": release.version.uri if release.version else str(ref)}
    if release.version:
        inputs["source"] = release.version.source
    inputs.update(fingerprint=registry.directory_fingerprint(release.path), heldout=heldout.source_id())
    if target is not None:
        inputs["tagged_version"] = target.uri
    model_cfg = read_model_config(release.path)
    from training.eval.suites import context_problems

    problems = context_problems(cfg, model_cfg)
    if problems:
        raise EvaluateError("settings do not fit the model:\n  " + "\n  ".join(problems))
    return run_stage(cfg, inputs, lambda stage: evaluate(cfg, stage, release.path, model_cfg, target))


def evaluate(cfg: EvaluateConfig, stage: StageRun, release: Path, model_cfg, target) -> Outcome:
    from training.parallel.setup import init_distributed, shutdown

    info = init_distributed(ParallelConfig(), cfg.seed)
    try:
        with stage.tracking() as mlflow_run:
            import mlflow

            from training.eval.generate import Generator
            from training.eval.suites import run_enabled
            from training.model.release import load_release

            print(f"{stage.name}: loading {release} ({model_cfg.name})", flush=True)
            gpt, _ = load_release(release)
            gpt.to(info.device)   # loaded on the CPU; the generator's inputs follow the weights
            gen = Generator(gpt, model_cfg.max_position_embeddings, cfg.batch_size, vocab_merges=model_cfg.vocab_merges)
            results = run_enabled(cfg, gen)
            metrics = {f"{suite}.{k}": v for suite, r in results.items() for k, v in r.metrics.items()}
            mlflow.log_metrics({f"eval/{k.replace('.', '/', 1)}": v for k, v in metrics.items() if math.isfinite(v)})
            mlflow.set_tags({"seekflow.checkpoint": stage.inputs["checkpoint"],
                             **({"seekflow.model_version": target.uri} if target else {})})
            out_dir = _write_results(stage.directory, results, metrics, stage.inputs, model_cfg.name)
            for name in ("results.json", "summary.md", "summary.csv"):
                mlflow.log_artifact(str(out_dir / name), artifact_path="eval")
            items = [row for r in results.values() for row in r.items]
            if items:
                table = {key: [row[key] for row in items] for key in items[0]}
                mlflow.log_table(table, artifact_file="eval/items.json")   # the MLflow UI's table view
            for r in results.values():   # a suite's own: the NIAH grid and heatmap, perplexity by position
                for path, suite_table in r.tables.items():
                    mlflow.log_table(suite_table, artifact_file=f"eval/{path}")
                for path, content in r.files.items():
                    (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
                    (out_dir / path).write_bytes(content)
                    mlflow.log_artifact(str(out_dir / path), artifact_path=str(Path("eval", path).parent))
            if target is not None:
                scores = {k: v for k, v in metrics.items() if not k.endswith(".seconds")}
                registry.tag_version(registry.mlflow_client(tracking_uri(cfg)), target.name, target.version,
                                     registry.eval_tags(scores, {"run_id": mlflow_run.info.run_id,
                                                                 "config_hash": stage.config_hash}))
                print(f"{stage.name}: tagged {target.uri} with seekflow.eval.* results", flush=True)
            outputs = {"results": str(out_dir / "results.json"), "summary": str(out_dir / "summary.md"),
                       "mlflow_run_id": mlflow_run.info.run_id, "model_version": target.uri if target else None}
        storage.publish(out_dir, exclude=("checkpoints", "manifest.json"))   # downloaded weights stay local
        headline = [f"{s}.{m}" for s, m in HEADLINE.items()] + [f"perplexity.{s}" for s in cfg.perplexity.sources]
        result = {"mlflow_run_id": outputs["mlflow_run_id"], "model_version": outputs["model_version"],
                  **{k: round(metrics[k], 6) for k in headline if k in metrics}}
        return Outcome(outputs, metrics, result)
    finally:
        shutdown()


def _write_results(out: Path, results: dict, metrics: dict, inputs: dict, model_name: str) -> Path:
    """results.json (metrics + every item), summary.md (a table a person reads), summary.csv (one row per metric)."""
    payload = {"checkpoint": inputs["checkpoint"], "model": model_name, "heldout": inputs["heldout"],
               "metrics": metrics, "items": {suite: r.items for suite, r in results.items()},
               "tables": {path: t for r in results.values() for path, t in r.tables.items()}}
    storage.write_json_atomic(out / "results.json", payload)
    lines = [f"# Evaluation of `{inputs['checkpoint']}` ({model_name})", "", "| suite | metric | value |",
             "|---|---|---|"]
    lines += [f"| {k.split('.', 1)[0]} | {k.split('.', 1)[1]} | {v:.4g} |" for k, v in metrics.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["suite", "metric", "value"])
    writer.writerows([*k.split(".", 1), v] for k, v in metrics.items())
    (out / "summary.csv").write_text(buffer.getvalue())
    return out
