"""Release checkpoints: model weights only (dist_checkpointing) plus the architecture that reads them.

A release directory is self-describing, so that `evaluate`, `export` and the registry need nothing but the directory:
    release/metadata.json, .metadata, *.distcp, common.pt   megatron-core dist_checkpointing (any parallel layout)
    release/seekflow_model.json                  the ModelConfig the weights belong to
    release/complete.json                        written last (training.checkpoint.save_release): every file's sha256
Loading reshards automatically, so a checkpoint saved by EP2 or PP2 loads into one process. `check_release` is the
cheap check (the files are there, with their recorded sizes); `load_release` verifies every file's sha256 before
dist_checkpointing unpickles any of it (training/integrity.py), as training.checkpoint.load_weights does.
"""
from __future__ import annotations

import json
from pathlib import Path

from training import integrity
from training.config import ModelConfig, ParallelConfig

MODEL_CONFIG_FILE = "seekflow_model.json"


class ReleaseError(RuntimeError):
    """A release that cannot load (missing files, another architecture): bad input, not retried."""

    permanent = True


def write_model_config(release_dir: Path, model: ModelConfig) -> None:
    (release_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model.model_dump(mode="json"), indent=2, sort_keys=True))


def check_release(release_dir: str | Path) -> Path:
    """The release directory, or a clear error when it is missing or torn (no metadata, no model config, no complete
    marker, or a file missing or of another size than the marker records). Sizes only: see `verify_release`."""
    path = Path(release_dir)
    if not path.is_dir():
        raise ReleaseError(f"checkpoint {path} does not exist")
    for required in ("metadata.json", MODEL_CONFIG_FILE):
        if not (path / required).is_file():
            raise ReleaseError(f"checkpoint {path} is incomplete: {required} is missing (torn or not a release)")
    reason = integrity.torn_reason(path)
    if reason is not None:
        raise ReleaseError(f"checkpoint {path} is incomplete: {reason}")
    return path


def verify_release(release_dir: str | Path) -> Path:
    """`check_release`, then every file's sha256 against complete.json (integrity.IntegrityError naming the file)."""
    path = check_release(release_dir)
    integrity.verify_tree(path)
    return path


def read_model_config(release_dir: str | Path) -> ModelConfig:
    path = check_release(release_dir)
    return ModelConfig.model_validate_json((path / MODEL_CONFIG_FILE).read_text())


def load_release(release_dir: str | Path, parallel: ParallelConfig | None = None):
    """Build the model of `release_dir` for this rank's layout and load its weights; returns (GPTModel, ModelConfig).
    A release whose files differ from its complete.json is refused first (integrity.IntegrityError naming the file).

    torch.distributed and megatron's parallel groups must be initialised (training.parallel.setup.init_distributed).
    """
    from megatron.core import dist_checkpointing, parallel_state

    from training.model.build import build_gpt

    path = check_release(release_dir)
    integrity.verify_on_every_node(path)   # before dist_checkpointing unpickles anything
    model_cfg = read_model_config(path)
    gpt, _ = build_gpt(model_cfg, parallel or ParallelConfig())
    sharded = gpt.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
    loaded = dist_checkpointing.load({"model": sharded}, str(path))
    gpt.load_state_dict(loaded["model"])
    gpt.eval()
    return gpt, model_cfg


def release_tensors(release_dir: str | Path) -> dict:
    """{checkpoint key: tensor} of a release, read straight from its files after the hash check: no model is built and
    no process group is needed. Routed experts come stacked, [E, out, in]; `_extra_state` bytes are left out."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = verify_release(release_dir)
    reader = dcp.FileSystemReader(str(path))
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if isinstance(meta, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def nonzero_parameters(release_dir: str | Path) -> dict[str, tuple[int, int]]:
    """{component: (non-zero, total)} parameters of a release (`release_tensors`): embedding, decoder, output_layer,
    mtp. A pruned release (compress) stores its pruned weights as zeros. Buffers (the router's expert bias) are not
    parameters."""
    counts: dict[str, tuple[int, int]] = {}
    for key, tensor in release_tensors(release_dir).items():
        if key.endswith("expert_bias"):
            continue
        component = key.split(".")[0]
        nonzero, total = counts.get(component, (0, 0))
        counts[component] = (nonzero + int((tensor != 0).sum()), total + tensor.numel())
    return counts


def format_nonzero(release: str, counts: dict[str, tuple[int, int]]) -> str:
    main = [c for c in counts if c != "mtp"]
    nonzero, total = (sum(counts[c][i] for c in main) for i in (0, 1))
    lines = [f"release {release}: {nonzero:,} of {total:,} parameters non-zero ({1 - nonzero / total:.2%} zero; "
             f"MTP apart, as the papers' totals)"]
    lines += [f"  {c:14s} {n:>14,} of {t:>14,} non-zero" for c, (n, t) in sorted(counts.items())]
    return "\n".join(lines) + "\n"
