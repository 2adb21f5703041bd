"""The `long_context` stage: YaRN context extension in phases (DeepSeek-V3 §4.3: 4K → 32K → 128K; V2 §3.1.4).

config -> the parent model (a release path, s3:// or models:/ reference, hash-verified by training.registry; default
the upstream training stage's release) -> per phase: data (the curate stage's corpus cut at the phase's length) +
loss (next-token cross-entropy) -> trainer, starting from the previous phase's release. Phase i lives in
{run_root}/{stage}/phase_<i>/ (checkpoints/, release/, phase.json). A rerun skips the phases that finished with the
same settings and starting weights, resumes the interrupted one from its checkpoint, and starts over a phase whose
settings or starting weights changed. References and phase fit are checked before the first step. The manifest
lists every phase's release; `outputs.release_checkpoint` is the last one, `outputs.parent` the lineage.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil

import torch.distributed as dist

from training import integrity, registry, storage
from training.config.long_context import PARENT_KIND, LongContextConfig, LongContextError, phase_configs
from training.manifest import manifest_hash, read_manifest
from training.parallel.setup import distributed
from training.stages.lifecycle import Outcome, StageRun, run_stage
from training.tracking import tracking_uri
from training.vocabulary import check_data


def run(cfg: LongContextConfig) -> dict | None:
    curate = _read(cfg, "data_manifest", cfg.data_manifest or storage.stage_uri(cfg.run_root, cfg.upstream("curate")))
    parent = {"ref": cfg.init_checkpoint, "manifest_hash": None}
    if cfg.init_checkpoint is None:   # the upstream training stage's release
        upstream = _read(cfg, "init_checkpoint", storage.stage_uri(cfg.run_root, cfg.upstream(PARENT_KIND)))
        parent = {"ref": upstream["outputs"]["release_checkpoint"], "manifest_hash": manifest_hash(upstream)}
    with distributed(cfg.parallel, cfg.seed) as info:
        from megatron.core import parallel_state

        from training.model.release import read_model_config

        release = resolve_parent(cfg, parent)
        model = read_model_config(release)
        check_data(curate["outputs"]["tokenizer"], model, where=f"{cfg.stage_name}.init_checkpoint's model")
        phases = phase_configs(cfg, model, parallel_state.get_data_parallel_world_size())
        inputs = {"data_manifest_hash": manifest_hash(curate), "init_checkpoint": parent["ref"],
                  "parent_release_sha256": parent["release_sha256"]}
        return run_stage(cfg, inputs, lambda stage: extend(cfg, stage, curate, phases, parent, release, info))


def _read(cfg: LongContextConfig, field: str, location: str) -> dict:
    try:
        return read_manifest(location)
    except FileNotFoundError as err:
        raise LongContextError(f"{cfg.stage_name}.{field}: {err}") from None


def resolve_parent(cfg: LongContextConfig, parent: dict):
    """The verified local release of `parent["ref"]`, on every rank; fills in the lineage (`uri`: the reference, a
    registered one pinned to its version once for the whole job; `model_name`, `version`, `release_sha256`). A
    RegistryError naming the field when the reference is missing, torn or altered."""
    uri, ref = tracking_uri(cfg), parent["ref"]
    pinned = [(ref, None, None)]
    if dist.get_rank() == 0 and registry.is_registry_ref(ref):
        try:   # an unreachable server is transient (retried); an unknown model, version or alias is not
            registry.check_tracking_server(uri, require_registry=True)
            version = registry.resolve_version(registry.mlflow_client(uri), ref)
            pinned = [(version.uri, version.name, version.version)]
        except registry.RegistryError as err:
            pinned = [(str(err), err.permanent)]
    dist.broadcast_object_list(pinned, src=0)
    try:
        if len(pinned[0]) == 2:
            raise registry.RegistryError(*pinned[0])
        into = storage.stage_dir(cfg.run_root, cfg.stage_name) / "init"
        release = registry.resolve_release_on_every_rank(pinned[0][0], tracking_uri=uri, into=into)
    except registry.RegistryError as err:
        raise registry.RegistryError(f"{cfg.stage_name}.init_checkpoint: {err}", permanent=err.permanent) from None
    parent.update(zip(("uri", "model_name", "version"), pinned[0]), release_sha256=integrity.marker_digest(release))
    return release


def extend(cfg: LongContextConfig, stage: StageRun, curate: dict, phases, parent: dict, release, info) -> Outcome:
    records, source, key = [], (parent["uri"], lambda: release), stage.inputs
    with stage.tracking(enabled=info.is_main) as mlflow_run:
        if mlflow_run:
            import mlflow

            mlflow.set_tags({"seekflow.init_checkpoint": parent["ref"],
                             "seekflow.parent_version": parent["uri"] if parent["version"] else "none"})
        for i, phase in enumerate(phases):
            key = phase_key(cfg, i, key)
            records.append(run_phase(cfg, stage, curate, i, phase, source, key, info, mlflow_run))
            uri = records[-1]["release_checkpoint"]
            source = (uri, lambda uri=uri: registry.resolve_release_on_every_rank(
                uri, tracking_uri=tracking_uri(cfg), into=stage.directory / "init"))
        run_id = mlflow_run.info.run_id if mlflow_run else None
    last = records[-1]
    outputs = {"release_checkpoint": last["release_checkpoint"], "checkpoints": last["checkpoints"],
               "phases": records, "parent": parent, "mlflow_run_id": run_id,
               "max_position_embeddings": last["max_position_embeddings"], "rope_scaling": last["rope_scaling"]}
    metrics = {"final_loss": last["final_loss"], "steps": sum(r["steps"] for r in records),
               "tokens": sum(r["tokens"] for r in records),
               **{f"phase_{i}.{k}": r[k] for i, r in enumerate(records) for k in ("final_loss", "steps", "tokens")}}
    result = {"final_loss": last["final_loss"], "steps": metrics["steps"],
              "release_checkpoint": last["release_checkpoint"], "mlflow_run_id": run_id, "parent": parent["uri"]}
    return Outcome(outputs, metrics, result, mlflow_run_id=run_id)


def phase_key(cfg: LongContextConfig, i: int, previous) -> str:
    """What phase i's result depends on: its settings and what it starts from (the stage's inputs for phase 0, the
    previous phase's key after that)."""
    what = [previous, cfg.rope_scaling, cfg.original_max_position_embeddings, cfg.phases[i].model_dump(),
            cfg.optimizer.model_dump(), cfg.train.micro_batch_size, cfg.train.precision, cfg.seed]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_phase(cfg, stage: StageRun, curate: dict, i: int, phase, source, key: str, info, mlflow_run) -> dict:
    """Phase i from `source` ((reference, fetch)) unless it already finished with the same `key` (its settings and
    starting weights); its record for the manifest."""
    directory, label = stage.directory / f"phase_{i}", f"{stage.name}/phase_{i}"
    marker_uri = storage.join(storage.uri_of(stage.directory, cfg.run_root), f"phase_{i}", "phase.json")
    marker = [json.loads(storage.read_text(marker_uri) or "{}") if info.is_main else None]
    dist.broadcast_object_list(marker, src=0)   # every rank takes rank 0's decision
    marker = marker[0]
    if marker.get("key") == key and marker.get("record"):
        if info.is_main:
            print(f"{label}: already done with these settings and starting weights; skipping", flush=True)
        return marker["record"]
    if info.is_main:
        if marker and marker.get("key") != key:   # another phase's checkpoints: never resume them
            print(f"{label}: settings or starting weights changed; starting the phase over", flush=True)
            for part in ("checkpoints", "release"):
                shutil.rmtree(directory / part, ignore_errors=True)
                storage.delete(storage.uri_of(directory / part, cfg.run_root))   # (s3 run roots)
        storage.write_text(marker_uri, json.dumps({"key": key}))
    dist.barrier()
    directory.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, stage, curate, phase, directory, label, source, info)
    model, where = phase.model, lambda part: storage.uri_of(directory / part, cfg.run_root)
    record = {"seq_length": phase.train.seq_length, "release_checkpoint": where("release"),
              "checkpoints": where("checkpoints"), "started_from": source[0],
              "max_position_embeddings": model.max_position_embeddings,
              "rope_scaling": model.rope_scaling.model_dump() if model.rope_scaling else None}
    with _phase_run(mlflow_run, label) as child:
        if child:
            import mlflow

            mlflow.log_params({**cfg.phases[i].model_dump(), **{k: json.dumps(record[k]) for k in record}})
        fitted = trainer.fit(child)
        record.update(mlflow_run_id=child.info.run_id if child else None,
                      **{k: fitted[k] for k in ("final_loss", "steps", "tokens")})
    if info.is_main:
        storage.write_text(marker_uri, json.dumps({"key": key, "record": record}))
    dist.barrier()
    return record


def build_trainer(cfg, stage: StageRun, curate: dict, phase, directory, label: str, source, info):
    """The GPT train module on the corpus at the phase's length, from the `source` weights, in the Trainer."""
    from training.stages.pretrain import curated_dataset
    from training.train.callbacks import ExpertLoad
    from training.train.gpt_module import GPTTrainModule
    from training.train.losses import NextTokenLoss
    from training.train.trainer import InitialWeights, Trainer

    module = GPTTrainModule(phase, info.device, loss=NextTokenLoss(), dataset=lambda num_samples: (
        curated_dataset(phase, curate, stage, info.local_rank, num_samples)))
    return Trainer(module, phase.train, info, label=label, directory=directory, run_root=cfg.run_root,
                   init_weights=InitialWeights(*source), callbacks=[ExpertLoad(directory / "expert_load_heatmap.png")])


def _phase_run(mlflow_run, name: str):
    """A nested MLflow run per phase under the stage's run (rank 0; nothing elsewhere): its own steps and metrics."""
    if mlflow_run is None:
        return contextlib.nullcontext()
    import mlflow

    return mlflow.start_run(run_name=name, nested=True, tags={"seekflow.phase": name})
