"""The `evaluate` stage: score a release checkpoint on HumanEval, FIM, passkey, arithmetic and held-out perplexity.

Input is a release directory or a registered version (`models:/name@alias`, `models:/name/version`); default the
pretrain stage's release under run_root. Everything that can be checked without the model is checked first: the
tracking server answers, the registry reference resolves, the checkpoint is complete (`check_release`), and the
suites' prompts fit the model's context. Only then is the model loaded (one process, megatron-core GPTModel).

Results: metrics `eval/<suite>/<metric>` in one MLflow run, per-item results as an MLflow table
(`eval/items.json`) plus `eval/results.json`, `eval/summary.md` and `eval/summary.csv`, and, for a registered
version, `seekflow.eval.<suite>.<metric>` tags on that version. The manifest is written last.
"""
from __future__ import annotations

import csv
import functools
import io
import math
import os
import time
from pathlib import Path

from training import storage
from training.config import EvaluateConfig, ParallelConfig, config_hash
from training.eval import heldout
from training.eval.registry import (EvaluateError, ModelVersion, check_tracking_server, directory_fingerprint,
                                    download_release, is_registry_ref, resolve_version, tag_version)
from training.manifest import finished, invalidate, read_manifest, write_manifest
from training.model.release import ReleaseError, check_release, read_model_config
from training.storage import stage_dir
from training.tracking import stage_run, tracking_uri

STAGE = "evaluate"
HEADLINE = {"humaneval": "pass_at_1", "fim": "exact_match", "passkey": "accuracy", "arith": "accuracy"}


def run(cfg: EvaluateConfig) -> dict:
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EvaluateError("evaluate runs in one process; launch it without torchrun (nproc 1)")
    chash = config_hash(cfg)
    uri = tracking_uri(cfg)
    check_tracking_server(uri)
    # Lazy: opening a sqlite store creates it, and a bad local checkpoint must fail before anything is written.
    client = functools.cache(lambda: _client(uri))
    release, source, inputs = _checkpoint(cfg, client)
    target = resolve_version(client(), cfg.model_version) if cfg.model_version else source
    if target is not None:
        inputs["tagged_version"] = target.uri
    model_cfg = read_model_config(release)
    from training.eval.suites import context_problems

    problems = context_problems(cfg, model_cfg)
    if problems:
        raise EvaluateError("settings do not fit the model:\n  " + "\n  ".join(problems))
    done = finished(cfg.run_root, STAGE, chash, inputs)
    if done:
        print(f"evaluate: already evaluated {inputs['checkpoint']} with config {chash}; skipping", flush=True)
        return done
    invalidate(cfg.run_root, STAGE)

    from training.parallel.setup import init_distributed, shutdown

    info = init_distributed(ParallelConfig(), cfg.seed)
    try:
        with stage_run(cfg, STAGE, chash) as mlflow_run:
            import mlflow

            from training.eval.generate import Generator
            from training.eval.suites import run_enabled
            from training.model.release import load_release

            print(f"evaluate: loading {release} ({model_cfg.name})", flush=True)
            gpt, _ = load_release(release)
            gpt.to(info.device)   # loaded on the CPU; the generator's inputs follow the weights
            gen = Generator(gpt, model_cfg.max_position_embeddings, cfg.batch_size)
            results = run_enabled(cfg, gen)
            metrics = {f"{suite}.{k}": v for suite, r in results.items() for k, v in r.metrics.items()}
            mlflow.log_metrics({f"eval/{k.replace('.', '/', 1)}": v for k, v in metrics.items() if math.isfinite(v)})
            mlflow.set_tags({"seekflow.checkpoint": inputs["checkpoint"],
                             **({"seekflow.model_version": target.uri} if target else {})})
            out_dir = _write_results(cfg, results, metrics, inputs, model_cfg.name)
            for name in ("results.json", "summary.md", "summary.csv"):
                mlflow.log_artifact(str(out_dir / name), artifact_path="eval")
            items = [row for r in results.values() for row in r.items]
            if items:
                table = {key: [row[key] for row in items] for key in items[0]}
                mlflow.log_table(table, artifact_file="eval/items.json")   # the MLflow UI's table view
            if target is not None:
                tag_version(client(), target, {k: v for k, v in metrics.items() if not k.endswith(".seconds")},
                            {"run_id": mlflow_run.info.run_id, "config_hash": chash})
                print(f"evaluate: tagged {target.uri} with seekflow.eval.* results", flush=True)
            outputs = {"results": str(out_dir / "results.json"), "summary": str(out_dir / "summary.md"),
                       "mlflow_run_id": mlflow_run.info.run_id, "model_version": target.uri if target else None}
        storage.publish(out_dir, exclude=("checkpoints", "manifest.json"))   # downloaded weights stay local
        headline = [f"{s}.{m}" for s, m in HEADLINE.items()] + [f"perplexity.{s}" for s in cfg.perplexity.sources]
        result = {"mlflow_run_id": outputs["mlflow_run_id"], "model_version": outputs["model_version"],
                  **{k: round(metrics[k], 6) for k in headline if k in metrics}}
        return write_manifest(cfg.run_root, STAGE, config_hash=chash, inputs=inputs, outputs=outputs,
                              metrics=metrics, started=started, result=result)
    finally:
        shutdown()


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _checkpoint(cfg: EvaluateConfig, client) -> tuple[Path, ModelVersion | None, dict]:
    """(local release directory, registered version or None, manifest inputs) for the configured checkpoint."""
    ref = cfg.checkpoint
    if ref is None:
        pretrain = read_manifest(storage.stage_uri(cfg.run_root, "pretrain"))
        ref = pretrain["outputs"]["release_checkpoint"]
    version = None
    if is_registry_ref(ref):
        version = resolve_version(client(), ref)
        import mlflow

        mlflow.set_tracking_uri(client().tracking_uri)   # download_artifacts resolves mlflow-artifacts:/ through it
        path = download_release(version, stage_dir(cfg.run_root, STAGE) / "checkpoints")
        inputs = {"checkpoint": version.uri, "source": version.source}
    else:
        path = storage.fetch(ref) if storage.is_remote(ref) else Path(ref)
        inputs = {"checkpoint": str(ref)}
    try:
        check_release(path)
    except ReleaseError as err:
        raise EvaluateError(str(err)) from None
    inputs["fingerprint"] = directory_fingerprint(path)
    inputs["heldout"] = heldout.source_id()
    return path, version, inputs


def _write_results(cfg: EvaluateConfig, results: dict, metrics: dict, inputs: dict, model_name: str) -> Path:
    """results.json (metrics + every item), summary.md (a table a person reads), summary.csv (one row per metric)."""
    out = stage_dir(cfg.run_root, STAGE)
    payload = {"checkpoint": inputs["checkpoint"], "model": model_name, "heldout": inputs["heldout"],
               "metrics": metrics, "items": {suite: r.items for suite, r in results.items()}}
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
