"""YaRN numerics: megatron-core's MLA rotary embedding and softmax scale, built from our `ModelConfig.rope_scaling`,
against transformers' YaRN rope initialisation and its DeepseekV3 rotary embedding and attention, for the papers'
settings:

- DeepSeek-V3 §4.3 (and its released config.json): s = 40, α (beta_slow) = 1, β (beta_fast) = 32, from a 4K
  context, mscale = mscale_all_dim = 1, i.e. √t = 0.1 ln s + 1;
- DeepSeek-V2 §3.1.4 (and its config.json): the same, with mscale = mscale_all_dim = 0.707, i.e. √t = 0.0707 ln s + 1.

Each model is the preset's attention (d_h = 128, d_h^R = 64, rope base 10000) in a one-layer model small enough to
build on a CPU; megatron runs in its own process (its CPU shim patches process-global state), as a probe of this file.
Logits of a whole exported YaRN model beyond the original length: tests/training/export/test_export_hf.py.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.support.processes import run_probe

S, ORIGINAL, TARGET = 40.0, 4096, 163840   # V3 §4.3: 4K -> 128K with s = 40; HF's max_position_embeddings 163840
POSITIONS = [0, 1, 2047, 4095, 4096, 8191, 32767, 131071, TARGET - 1]
# rope_scaling of DeepSeek's released config.json files, as transformers reads them.
HF_ROPE = {
    "v3": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0},
    "v2": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707},
}
OURS = {"v3": ("deepseek-v3", {}), "v2": ("deepseek-v2", {"mscale": 0.707, "mscale_all_dim": 0.707})}
SQRT_T = {"v3": 0.1 * math.log(S) + 1, "v2": 0.0707 * math.log(S) + 1}   # the papers' formulas


def model_config(case: str):
    """The preset's model with YaRN on and everything but attention shrunk to one small dense layer."""
    from training.config import ModelConfig, resolve_stage_config

    preset, yarn = OURS[case]
    full = resolve_stage_config("pretrain", preset, overrides=["model.rope_scaling={}"]).model.model_dump()
    full.update(num_layers=1, hidden_size=64, num_attention_heads=2, ffn_hidden_size=64, vocab_size=128,
                num_experts=None, mtp_num_layers=0, q_lora_rank=16, kv_lora_rank=16, max_position_embeddings=TARGET)
    full["rope_scaling"].update(yarn)
    return ModelConfig.model_validate(full)


def _probe() -> None:
    from training.config import ParallelConfig
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    report = {}
    for case in OURS:
        model = model_config(case)
        gpt, _ = build_gpt(model, ParallelConfig())
        attention = gpt.decoder.layers[0].self_attention
        emb, concentration = attention.rotary_pos_emb(TARGET)     # what MLA's forward asks for: [s, 1, 1, d_h^R]
        freqs = emb[:, 0, 0, :]
        report[case] = {
            "rope_scaling": model.rope_scaling.model_dump(),
            "inv_freq": freqs[1, :model.qk_pos_emb_head_dim // 2].tolist(),   # position 1: 1 x inv_freq, exact
            "freqs": freqs[POSITIONS].tolist(), "concentration": concentration,
            "softmax_scale": attention.softmax_scale, "core_softmax_scale": attention.core_attention.softmax_scale,
            "q_head_dim": attention.q_head_dim}
    print(json.dumps(report), flush=True)
    shutdown()


@pytest.fixture(scope="module")
def megatron():
    return run_probe(__file__)


def hf_config(case: str):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=TARGET, rope_theta=10000.0, rope_scaling=dict(HF_ROPE[case]), rope_interleave=True)


@pytest.mark.parametrize("case", ["v3", "v2"])
def test_inverse_frequencies_match_transformers_yarn(megatron, case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    ours = torch.tensor(megatron[case]["inv_freq"], dtype=torch.float32)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(case))
    rotary = DeepseekV3RotaryEmbedding(hf_config(case))
    print(f"{case}: max |inv_freq diff| = {(ours - inv_freq).abs().max().item():.1e}")
    assert torch.equal(ours, inv_freq) and torch.equal(rotary.inv_freq, inv_freq)
    # cos/sin scale ("attention factor"): mscale / mscale_all_dim = 1 for both papers' configs.
    assert megatron[case]["concentration"] == attention_factor == rotary.attention_scaling == 1.0


@pytest.mark.parametrize("case", ["v3", "v2"])
def test_cos_sin_match_deepseek_v3_rotary_embedding_beyond_the_original_length(megatron, case):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    half = torch.tensor(megatron[case]["freqs"], dtype=torch.float32)         # [positions, d_h^R / 2 ... x2]
    m = megatron[case]["concentration"]
    rotary = DeepseekV3RotaryEmbedding(hf_config(case))
    cos, sin = rotary(torch.zeros(1, len(POSITIONS), 64), torch.tensor([POSITIONS]))
    # megatron applies cos(freqs) x mscale to the rotary half of q and k (apply_rotary_pos_emb with mscale).
    diff = max((half.cos() * m - cos[0]).abs().max().item(), (half.sin() * m - sin[0]).abs().max().item())
    print(f"{case}: max |cos/sin diff| over positions up to {POSITIONS[-1]} = {diff:.1e}")
    assert diff == 0.0


@pytest.mark.parametrize("case", ["v3", "v2"])
def test_attention_scale_is_the_papers_sqrt_t_squared(megatron, case):
    """√t multiplies both q and k (V3 §4.3), so the softmax scale is t / √(d_h + d_h^R); HF's DeepseekV3Attention
    applies the same factor (yarn_get_mscale(s, mscale_all_dim)²)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    ours = megatron[case]
    assert ours["q_head_dim"] == 192
    hf_scale = DeepseekV3Attention(hf_config(case), layer_idx=0).scaling
    paper = SQRT_T[case] ** 2 / math.sqrt(192)
    print(f"{case}: softmax scale megatron {ours['softmax_scale']:.10f}, transformers {hf_scale:.10f}, "
          f"paper {paper:.10f}")
    assert ours["softmax_scale"] == ours["core_softmax_scale"] == pytest.approx(hf_scale, rel=1e-12, abs=0)
    assert ours["softmax_scale"] == pytest.approx(paper, rel=1e-12, abs=0)
    assert ours["softmax_scale"] > 1.3 / math.sqrt(192)   # ~1.37² (V3) / ~1.26² (V2): the scale is really applied


@pytest.mark.parametrize("case", ["v3", "v2"])
def test_frequency_ramp_follows_the_yarn_rule(megatron, case):
    """YaRN (V3 §4.3): a dimension turning more than β = 32 times over the original 4K context keeps its frequency,
    one turning fewer than α = 1 times is interpolated by s, and the ones between are ramped between the two."""
    ours = megatron[case]["inv_freq"]
    for i, value in enumerate(ours):
        theta = 10000.0 ** (-2 * i / 64)
        rotations = ORIGINAL * theta / (2 * math.pi)
        if rotations > 32 * 1.5:      # margin: the ramp's edges are rounded to whole dimensions (floor/ceil)
            assert value == pytest.approx(theta, rel=1e-6), i
        elif rotations < 1 / 1.5:
            assert value == pytest.approx(theta / S, rel=1e-6), i
        else:
            assert theta / S * (1 - 1e-6) <= value <= theta * (1 + 1e-6), i
    assert ours == sorted(ours, reverse=True)


def test_our_config_is_the_released_configs():
    """The YaRN settings we build from are DeepSeek's: the export writes exactly the released rope_scaling."""
    from training.export.convert import _hf_rope_scaling

    for case in OURS:
        assert _hf_rope_scaling(model_config(case)) == HF_ROPE[case]


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    _probe()
