"""The model a training stage continues (code_cpt, sft, ...): pinned, fetched, checked and remembered.

The parent is pinned before anything runs (`models:/name@alias` -> `models:/name/<version>`), fetched hash-verified,
refused unless its architecture is the stage's `model`, recorded at the first start (`parent.json`, kept on resume)
and returned for the manifest (`outputs.parent`, which register turns into `seekflow.parent_version`). `cfg` is a
training stage config with `init_checkpoint`, `model` and a `pretrain` upstream.
"""
from __future__ import annotations

import json
from pathlib import Path

from training import integrity, registry, storage
from training.manifest import manifest_hash, read_manifest
from training.stages.lifecycle import StageRun
from training.tracking import tracking_uri

PARENT_FILE = "parent.json"   # under the stage: the parent this run's weights started from


class ParentError(ValueError):
    """A parent that is not there or is another architecture: bad input, named by field; not retried."""

    permanent = True


def pin_parent(cfg, field: str = "init_checkpoint", upstream: str = "pretrain", error=ParentError) -> dict:
    """{ref, uri, model_name, version, manifest_hash}: the model `cfg.<field>` names (unset: the release of the
    `upstream` stage instance under run_root), a registered one pinned to its version. Errors name `field`."""
    ref, upstream_hash = getattr(cfg, field), None
    if ref is None:
        try:
            manifest = read_manifest(storage.stage_uri(cfg.run_root, cfg.upstream(upstream)))
        except FileNotFoundError as err:
            raise error(f"{field}: unset, and {err}") from None
        ref, upstream_hash = manifest["outputs"]["release_checkpoint"], manifest_hash(manifest)
    parent = {"ref": ref, "uri": ref, "model_name": None, "version": None, "manifest_hash": upstream_hash}
    if registry.is_registry_ref(ref):
        uri = tracking_uri(cfg)
        try:
            registry.check_tracking_server(uri, require_registry=True)
            version = registry.resolve_version(registry.mlflow_client(uri), ref)
        except registry.RegistryError as err:
            raise registry.RegistryError(f"{field}: {err}", permanent=err.permanent) from None
        parent.update(uri=version.uri, model_name=version.name, version=version.version)
    return parent


def fetch_parent(cfg, parent: dict, stage: StageRun, allowed: frozenset[str] = frozenset(),
                 field: str = "init_checkpoint", into: str = "init") -> Path:
    """The parent release on this machine (every rank calls it; hash-verified, under the stage's `into` folder),
    refused unless its architecture is `model` apart from the `allowed` fields: continued pretraining changes no
    architecture field, not even the context ones; fine-tuning takes the parent's context (see
    `with_parent_context`). Errors name `field`."""
    from training.model.release import read_model_config

    try:
        release = registry.resolve_release_on_every_rank(parent["uri"], tracking_uri=tracking_uri(cfg),
                                                         into=stage.directory / into)
    except registry.RegistryError as err:
        raise registry.RegistryError(f"{field} {parent['ref']}: {err}", permanent=err.permanent) from None
    differences = cfg.model.architecture_differences(read_model_config(release).model_dump(mode="json"), allowed)
    if differences:
        raise ParentError(f"{field} {parent['ref']}: the parent's architecture differs from `model` "
                          f"({'; '.join(differences)}); {cfg.stage_spec.kind} continues the parent's architecture "
                          f"unchanged")
    return release


def with_parent_context(cfg, release: Path):
    """`cfg` with the parent's context fields (model.rope_scaling, model.max_position_embeddings): a fine-tuned
    model keeps the context its parent was extended to (DeepSeek-V3 §5 fine-tunes the 128K model of §4.3)."""
    from training.model.release import read_model_config

    recorded = read_model_config(release)
    context = {field: getattr(recorded, field) for field in type(cfg.model).CONTEXT_FIELDS}
    if cfg.train.seq_length > recorded.max_position_embeddings:
        raise ParentError(f"train.seq_length ({cfg.train.seq_length}) exceeds the parent's max_position_embeddings "
                          f"({recorded.max_position_embeddings})")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=context)})


def record_parent(stage: StageRun, parent: dict, release: Path) -> Path:
    """The Trainer's start from the parent (not called on resume): remember which weights this run descends from."""
    if stage.writes:
        lineage = {**parent, "release_sha256": integrity.marker_digest(release)}
        storage.write_text(storage.join(stage.uri, PARENT_FILE), json.dumps(lineage, indent=2))
    return release


def started_from(stage: StageRun, parent: dict, release: Path) -> dict:
    """The recorded parent (a resumed run keeps the one it started from), else `parent`."""
    text = storage.read_text(storage.join(stage.uri, PARENT_FILE))
    lineage = json.loads(text) if text else {**parent, "release_sha256": integrity.marker_digest(release)}
    if lineage["uri"] != parent["uri"] and stage.writes:
        print(f"{stage.name}: warning: resumed weights that started from {lineage['uri']}; init_checkpoint now "
              f"names {parent['uri']}, which a resumed run ignores (a new run_root starts from it)", flush=True)
    return lineage
