"""Hugging Face export/import: megatron-core forward vs transformers' DeepseekV3ForCausalLM on the same tokens.

The tiny preset is trained 3 steps (small vocabulary, synthetic data) once per module; every megatron-core run
(training, export, import, forward) is its own process, since the CPU shim patches process-global state.
transformers runs here, offline, from the exported directory only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.micro import VOCAB, write_corpus
from tests.support.mlflow_store import sqlite_store
from tests.support.processes import ok, run_python, run_training, torchrun
from tests.support.tamper import flip_byte, largest
from training.config import resolve_stage_config
from training.export.convert import ExportError, hf_config, model_config_from_hf

os.environ["HF_HUB_OFFLINE"] = "1"   # before transformers is imported: nothing may come from a hub
HERE = Path(__file__).resolve().parent
TOL = 1e-4


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_python(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=timeout)


def export(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("-m", "training.export", "hf", "--checkpoint", str(checkpoint), "--out", str(out), *extra)


def megatron_logits(release: Path, tokens_file: Path, out: Path) -> dict:
    ok(run(str(HERE / "export_megatron.py"), "logits", str(release), str(tokens_file), str(out)))
    return torch.load(out)


def hf_model(path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
    return model.eval(), info


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The micro preset (3 layers) trained 3 steps, its release exported to HF, and megatron-core's logits on fixed
    tokens."""
    root = tmp_path_factory.mktemp("export")
    write_corpus(root / "run", documents=64)
    ok(run_training("pretrain", "--preset", "micro", "--set", f"run_root={root / 'run'}", "--set", "train.steps=3",
                    "--set", "train.global_batch_size=2", "--set", "train.save_interval=100",
                    "--set", f"tracking.uri={sqlite_store(root)}"))
    release = root / "run" / "pretrain" / "release"
    exported = ok(export(release, root / "hf"))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    return {"root": root, "release": release, "hf": root / "hf", "tokens": tokens, "export_stdout": exported.stdout,
            "megatron": megatron_logits(release, root / "tokens.pt", root / "megatron.pt")}


@pytest.fixture(scope="module")
def sharpened(trained):
    """The trained weights plus noise (std 0.1), so that attention, RoPE and routing shape the logits (after 3 steps
    from std 0.006 they barely do): written as HF, imported to megatron-core, exported back (sharded)."""
    from safetensors.torch import load_file, save_file

    root = trained["root"]
    src, dst = trained["hf"], root / "hf_sharp"
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(1)
    noisy = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        std = 0.05 if name.endswith("e_score_correction_bias") else 0.2 if tensor.dim() == 1 else 0.1
        noisy[name] = tensor + std * torch.randn(tensor.shape, generator=gen)
    save_file(noisy, dst / "model.safetensors", metadata={"format": "pt"})
    imported = ok(run("-m", "training.export", "import-hf", "--hf", str(dst), "--out", str(root / "release_sharp")))
    ok(export(root / "release_sharp", root / "hf_sharp_again", "--max-shard-size", "300KB"))
    return {"hf": dst, "release": root / "release_sharp", "again": root / "hf_sharp_again", "weights": noisy,
            "import_stdout": imported.stdout,
            "megatron": megatron_logits(root / "release_sharp", root / "tokens.pt", root / "megatron_sharp.pt")}


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.fixture(scope="module")
def yarn(sharpened, trained):
    """The sharpened weights under YaRN, s = 4 from an 8-token context (the test tokens are 3x longer), imported to
    megatron-core from an HF config.json that carries DeepSeek's `rope_scaling`."""
    root = trained["root"]
    dst = root / "hf_yarn"
    shutil.copytree(sharpened["hf"], dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(rope_scaling=YARN, max_position_embeddings=32)
    (dst / "config.json").write_text(json.dumps(config))
    ok(run("-m", "training.export", "import-hf", "--hf", str(dst), "--out", str(root / "release_yarn")))
    return {"hf": dst, "release": root / "release_yarn",
            "megatron": megatron_logits(root / "release_yarn", root / "tokens.pt", root / "megatron_yarn.pt")}


# The long-context case (issue 16): the tiny profile's 4x extension, 64 -> 256 tokens, every position compared.
YARN_LONG = {**YARN, "original_max_position_embeddings": 64}
LONG = 256


@pytest.fixture(scope="module")
def yarn_long(sharpened, trained):
    """The sharpened weights under YaRN s = 4 from a 64-token context, scored on 256 tokens (192 of them beyond the
    original length), imported to megatron-core from the HF config.json as above."""
    root = trained["root"]
    dst = root / "hf_yarn_long"
    shutil.copytree(sharpened["hf"], dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(rope_scaling=YARN_LONG, max_position_embeddings=LONG)
    (dst / "config.json").write_text(json.dumps(config))
    ok(run("-m", "training.export", "import-hf", "--hf", str(dst), "--out", str(root / "release_yarn_long")))
    tokens = torch.randint(0, VOCAB, (2, LONG), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, root / "tokens_long.pt")
    return {"hf": dst, "release": root / "release_yarn_long", "tokens": tokens,
            "megatron": megatron_logits(root / "release_yarn_long", root / "tokens_long.pt",
                                        root / "megatron_yarn_long.pt")}


# ------------------------------------------------------------------------------------------------- logit parity --
def test_trained_tiny_model_logits_match_transformers(trained):
    model, info = hf_model(trained["hf"])
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Only the MTP module (decoder layer index num_layers, DeepSeek's layout) is left for MtpModel to load.
    assert info["unexpected_keys"] and all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    ref = trained["megatron"]["logits"]
    assert ref.shape == (2, 24, VOCAB)
    diff = (hf_logits(model, trained["tokens"]) - ref).abs().max().item()
    print(f"trained tiny: max |logit diff| = {diff:.2e} (logits up to {ref.abs().max():.3f})")
    assert diff < TOL
    assert "export: wrote" in trained["export_stdout"] and "cannot be fed to this model" in trained["export_stdout"]


def test_imported_weights_match_with_sharp_logits_and_mtp(sharpened, trained):
    """Import direction, at a logit scale where a wrong RoPE layout, routing or norm is obvious."""
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_layers import MtpModel

    tokens, ref = trained["tokens"], sharpened["megatron"]["logits"]
    model, _ = hf_model(sharpened["again"])   # the sharded re-export of the imported checkpoint
    out = hf_logits(model, tokens)
    diff = (out - ref).abs().max().item()
    print(f"sharpened: max |logit diff| = {diff:.2e} (logit std {ref.std():.2f})")
    assert ref.std() > 0.5 and diff < TOL
    # The comparison is sensitive to the known traps: each wrong setting moves the logits far beyond the tolerance.
    for wrong in ({"rope_interleave": False}, {"norm_topk_prob": False}, {"topk_group": 4}):
        import transformers

        bad = transformers.DeepseekV3ForCausalLM.from_pretrained(sharpened["again"], dtype=torch.float32, **wrong)
        assert (hf_logits(bad.eval(), tokens) - ref).abs().max() > 100 * TOL, wrong

    # MTP: transformers' own MtpModel loads layer num_layers; its draft logits match megatron's MTP head.
    layers = model.config.num_hidden_layers
    model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{layers}\..*"]   # HF hard-codes layer 61
    mtp = MtpModel.from_pretrained(model).eval()
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state
        embeds = model.model.embed_tokens(torch.roll(tokens, -1, dims=1))   # token i+1 beside hidden state i
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        mask = create_causal_mask(config=mtp.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                  position_ids=positions)
        draft = mtp.layers[0](embeds, hidden, position_embeddings=model.model.rotary_emb(embeds, positions),
                              attention_mask=mask, position_ids=positions, cache=None)
        mtp_logits = model.lm_head(draft)
    # The last position has no next token (megatron zeroes it, torch.roll wraps): compare the others.
    assert (mtp_logits - sharpened["megatron"]["mtp_logits"][0])[:, :-1].abs().max() < TOL


def test_yarn_logits_match_transformers(yarn, sharpened, trained):
    """megatron-core's YaRN (frequency ramp between β and α, cos/sin and softmax mscale) equals HF DeepseekV3's."""
    import transformers

    released = json.loads((yarn["release"] / "seekflow_model.json").read_text())
    assert released["rope_scaling"] == {k: v for k, v in YARN.items() if k != "type"}
    ref, tokens = yarn["megatron"]["logits"], trained["tokens"]
    model, _ = hf_model(yarn["hf"])
    assert model.config.rope_parameters["rope_type"] == "yarn"
    diff = (hf_logits(model, tokens) - ref).abs().max().item()
    print(f"YaRN: max |logit diff| = {diff:.2e} (logit std {ref.std():.2f})")
    assert diff < TOL
    # The comparison can fail: YaRN moves the logits far from plain RoPE's, and so does dropping its softmax
    # temperature (mscale_all_dim 0) or moving its ramp (α 0.1: one more rotary frequency only partly interpolated).
    assert (ref - sharpened["megatron"]["logits"]).abs().max() > 100 * TOL
    for wrong in ({"mscale_all_dim": 0.0}, {"beta_slow": 0.1}):
        config = transformers.AutoConfig.from_pretrained(yarn["hf"])
        config.rope_parameters.update(wrong)
        bad = transformers.DeepseekV3ForCausalLM.from_pretrained(yarn["hf"], config=config, dtype=torch.float32)
        assert (hf_logits(bad.eval(), tokens) - ref).abs().max() > 100 * TOL, wrong


def test_yarn_logits_match_transformers_beyond_the_original_length(yarn_long):
    """A 64 -> 256 extension (the tiny profile's long_context phase, issue 16): all 256 positions, including the 192
    beyond original_max_position_embeddings, match transformers within 1e-4."""
    import transformers

    released = json.loads((yarn_long["release"] / "seekflow_model.json").read_text())
    assert released["rope_scaling"]["original_max_position_embeddings"] == 64
    assert released["max_position_embeddings"] == LONG
    ref, tokens = yarn_long["megatron"]["logits"], yarn_long["tokens"]
    assert ref.shape == (2, LONG, VOCAB)
    model, _ = hf_model(yarn_long["hf"])
    diff = (hf_logits(model, tokens) - ref).abs()
    inside, beyond = diff[:, :64].max().item(), diff[:, 64:].max().item()
    print(f"YaRN 64 -> 256: max |logit diff| positions 0-63 {inside:.2e}, 64-255 {beyond:.2e} "
          f"(logit std {ref.std():.2f})")
    assert inside < TOL and beyond < TOL
    # Sensitive where it matters: without YaRN (plain RoPE, no softmax temperature) transformers' logits move far
    # from megatron's beyond the original length.
    config = transformers.AutoConfig.from_pretrained(yarn_long["hf"])
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    plain = transformers.DeepseekV3ForCausalLM.from_pretrained(yarn_long["hf"], config=config, dtype=torch.float32)
    assert (hf_logits(plain.eval(), tokens) - ref)[:, 64:].abs().max() > 100 * TOL


# -------------------------------------------------------------------------------------- files and round trip --
def test_export_writes_a_deepseek_v3_directory(trained):
    from transformers import AutoConfig, AutoTokenizer

    from training.tokenizer import load_tokenizer

    hf = trained["hf"]
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "seekflow_model.json", "tokenizer.json",
        "tokenizer_config.json"]
    config = AutoConfig.from_pretrained(hf)
    assert config.model_type == "deepseek_v3" and config.architectures == ["DeepseekV3ForCausalLM"]
    assert (config.num_experts_per_tok, config.n_group, config.topk_group, config.routed_scaling_factor) == (4, 4, 2, 1.0)
    assert config.rope_interleave and config.num_nextn_predict_layers == 1
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"
    assert AutoTokenizer.from_pretrained(hf).encode(text) == load_tokenizer().encode(text).ids
    assert json.loads((hf / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1}


def test_a_pruned_model_exports_with_the_same_logits(sharpened, trained, tmp_path):
    """The compress stage's output (issue 20): a release whose pruned weights are zeros (whole MLA heads and FFN
    neurons, then 90% of every decoder matrix by magnitude) exports, loads in transformers and gives the same
    logits; the zeros arrive as zeros."""
    from training.export.hf import read_safetensors

    pruned = tmp_path / "release_pruned"
    assert "pruned: 0.9" in ok(run(str(HERE / "export_megatron.py"), "prune", str(sharpened["release"]),
                                   str(pruned))).stdout
    ok(export(pruned, tmp_path / "hf"))
    weights = read_safetensors(tmp_path / "hf")
    attention = weights["model.layers.1.self_attn.o_proj.weight"]
    assert int((attention == 0).sum()) == round(0.9 * attention.numel())
    assert (weights["model.embed_tokens.weight"] != 0).all()
    model, info = hf_model(tmp_path / "hf")
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ref = megatron_logits(pruned, trained["root"] / "tokens.pt", tmp_path / "megatron.pt")["logits"]
    diff = (hf_logits(model, trained["tokens"]) - ref).abs().max().item()
    print(f"pruned: max |logit diff| = {diff:.2e} (logits up to {ref.abs().max():.3f})")
    assert diff < TOL


def test_round_trip_hf_megatron_hf_is_identical(sharpened):
    from training.export.hf import read_safetensors

    again = sharpened["again"]
    assert (again / "model.safetensors.index.json").is_file() and len(list(again.glob("model-*.safetensors"))) > 2
    back = read_safetensors(again)
    assert back.keys() == sharpened["weights"].keys()
    for name, tensor in sharpened["weights"].items():
        assert torch.equal(back[name], tensor), name
    for name in ("config.json", "seekflow_model.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (sharpened["hf"] / name).read_bytes(), name
    assert "import: wrote release checkpoint" in sharpened["import_stdout"]


def test_export_is_deterministic(trained, tmp_path):
    ok(export(trained["release"], tmp_path / "hf"))
    assert _file_bytes(tmp_path / "hf") == _file_bytes(trained["hf"])


@pytest.mark.slow
def test_export_does_not_depend_on_the_saved_layout(trained, tmp_path):
    """The release re-saved by 2 processes with expert parallelism 2 exports to the very same bytes."""
    resharded = tmp_path / "release_ep2"
    out = ok(run(*torchrun(2), str(HERE / "export_megatron.py"), "reshard",
                 str(trained["release"]), str(resharded)))
    assert "resharded: 4 local experts per rank" in out.stdout
    ok(export(resharded, tmp_path / "hf"))
    assert _file_bytes(tmp_path / "hf") == _file_bytes(trained["hf"])


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -------------------------------------------------------------------------------------------------- bad input --
def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_checkpoint_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-release"
    result = export(missing, tmp_path / "hf")
    assert result.returncode == 2
    assert f"checkpoint {missing} does not exist" in result.stderr
    _no_leftovers(tmp_path / "hf")
    result = run("-m", "training.export", "import-hf", "--hf", str(tmp_path / "no-hf"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and f"{tmp_path / 'no-hf'} does not exist" in result.stderr
    _no_leftovers(tmp_path / "r")


def test_torn_checkpoint_fails_clearly_and_leaves_nothing(trained, tmp_path):
    no_metadata = tmp_path / "no_metadata"
    shutil.copytree(trained["release"], no_metadata)
    (no_metadata / "metadata.json").unlink()
    result = export(no_metadata, tmp_path / "hf")
    assert result.returncode == 2
    assert f"checkpoint {no_metadata} is incomplete: metadata.json is missing" in result.stderr
    _no_leftovers(tmp_path / "hf")

    no_shard = tmp_path / "no_shard"   # metadata present, a data file gone: complete.json lists it
    shutil.copytree(trained["release"], no_shard)
    shard = next(no_shard.glob("*.distcp"))
    shard.unlink()
    result = export(no_shard, tmp_path / "hf")
    assert result.returncode == 2
    assert f"checkpoint {no_shard} is incomplete: no_shard/{shard.name} is missing" in result.stderr, result.stderr
    _no_leftovers(tmp_path / "hf")

    altered = tmp_path / "altered"   # a shard of the same size with other bytes: refused before it is read
    shutil.copytree(trained["release"], altered)
    shard = flip_byte(largest(altered))
    result = export(altered, tmp_path / "hf")
    assert result.returncode == 2
    assert re.search(rf"{re.escape(str(shard))}: sha256 .* recorded at save", result.stderr), result.stderr
    _no_leftovers(tmp_path / "hf")


def test_existing_output_is_not_replaced_without_overwrite(trained, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    result = export(trained["release"], out)
    assert result.returncode == 2 and f"output {out} already exists" in result.stderr


# ---------------------------------------------------------------------------------------------------- configs --
FULL_VOCABULARY = ["model.vocab_merges=null", "model.vocab_size=129280"]   # tiny's architecture on the full tokenizer


def test_a_vocabulary_subset_model_is_refused_naming_the_field():
    model = resolve_stage_config("pretrain", "tiny").model   # tiny trains on DeepSeek's first 3,824 merges
    with pytest.raises(ExportError, match="model.vocab_merges: is 3824: the embedding rows are a mapped subset"):
        hf_config(model, bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", FULL_VOCABULARY),
    ("deepseek-v3", []),
    ("deepseek-v3", ["model.rope_scaling={}", "model.max_position_embeddings=163840"]),   # V3 §4.3's YaRN
])
def test_config_round_trip(preset, overrides):
    model = resolve_stage_config("pretrain", preset, overrides=overrides).model
    config = hf_config(model, bos_token_id=0, eos_token_id=1)
    training_fields = model.model_dump()
    assert model_config_from_hf(json.loads(json.dumps(config)), training_fields) == model


@pytest.mark.parametrize("override, field", [
    (["model.moe_router_topk=2"], "moe_router_topk"),   # topk / group_topk = 1: HF ranks groups by their top-2
    (["model.moe_router_score_function=softmax"], "moe_router_score_function"),
    (["model.multi_latent_attention=false"], "multi_latent_attention"),
    (["model.norm_epsilon=1e-5"], "norm_epsilon"),
    (["model.moe_router_num_groups=8", "model.moe_router_group_topk=2"], "moe_router_num_groups"),
])
def test_configs_hf_cannot_represent_are_refused(override, field):
    model = resolve_stage_config("pretrain", "tiny", overrides=[*FULL_VOCABULARY, *override]).model
    with pytest.raises(ExportError, match=rf"model\.{field}"):
        hf_config(model, bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("rope_scaling, message", [
    ({"type": "linear", "factor": 2.0}, "only YaRN"),
    ({**YARN, "attention_factor": 1.2}, "attention_factor"),
    ({**YARN, "truncate": False}, "truncate"),
    ({**YARN, "mscale": None}, "mscale_all_dim without mscale"),
    ({k: v for k, v in YARN.items() if k != "factor"}, "lacks 'factor'"),
])
def test_rope_scalings_megatron_cannot_mirror_are_refused(rope_scaling, message):
    config = hf_config(resolve_stage_config("pretrain", "tiny", overrides=FULL_VOCABULARY).model, bos_token_id=0,
                       eos_token_id=1)
    with pytest.raises(ExportError, match=message):
        model_config_from_hf({**config, "rope_scaling": rope_scaling})


def test_quantised_checkpoints_are_refused():
    config = hf_config(resolve_stage_config("pretrain", "tiny", overrides=FULL_VOCABULARY).model, bos_token_id=0,
                       eos_token_id=1)
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with pytest.raises(ExportError, match="quantization_config .*'fp8'.* dequantise"):
        model_config_from_hf({**config, "quantization_config": fp8})


def test_yarn_defaults_are_deepseek_v3s():
    """V3 §4.3: s = 40, α = 1, β = 32 and √t = 0.1 ln s + 1 (megatron's mscale with mscale_all_dim 1), from 4K."""
    yarn = resolve_stage_config("pretrain", "deepseek-v3", overrides=["model.rope_scaling={}"]).model.rope_scaling
    assert (yarn.factor, yarn.beta_slow, yarn.beta_fast, yarn.original_max_position_embeddings) == (40, 1, 32, 4096)
    assert yarn.mscale_all_dim == yarn.mscale == 1.0
