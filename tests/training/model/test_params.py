"""Parameter counter and scaling-law planner: the papers' sizes, megatron-core's own count, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import list_presets, resolve_stage_config
from training.model.params import count_params, non_embedding_flops_per_token, plan

ROOT = Path(__file__).resolve().parents[3]


def _count(preset, overrides=()):
    return count_params(resolve_stage_config("pretrain", preset, overrides=list(overrides)).model)


# Paper totals (billions). Every one lands within 1%.
@pytest.mark.parametrize("preset, paper", [
    ("deepseek-v3", 671),        # V3 abstract, §4.2: 671B total (MTP module excluded)
    ("deepseek-v2", 236),        # V2 abstract, §3.1.2: 236B total
    ("deepseek-v2-lite", 15.7),  # V2 App. B: 15.7B total
    ("deepseek-moe-16b", 16.4),  # DeepSeekMoE §5.1.2: 16.4B total
])
def test_total_parameters_match_the_papers(preset, paper):
    assert _count(preset).total / 1e9 == pytest.approx(paper, rel=0.01)


# Paper activated figures are rounded to two digits, so 1% is tighter than their own precision. Measured (one
# embedding row per token, see training/model/params.py): V3 36.63B (-1.01%), V2 20.85B (-0.71%), V2-Lite 2.45B
# (+2.1%; the paper's 2.4 truncates 2.451). DeepSeekMoE 16B's 2.8B counts the whole embedding table: 2.83B (+1.0%).
@pytest.mark.parametrize("preset, paper, rel", [
    ("deepseek-v3", 37, 0.011),
    ("deepseek-v2", 21, 0.01),
    ("deepseek-v2-lite", 2.4, 0.022),
])
def test_activated_parameters_match_the_papers(preset, paper, rel):
    assert _count(preset).activated / 1e9 == pytest.approx(paper, rel=rel)


def test_deepseek_moe_16b_activated_counts_its_embedding_table():
    c = _count("deepseek-moe-16b")
    assert c.activated_with_embedding_table / 1e9 == pytest.approx(2.8, rel=0.011)
    assert c.activated < c.activated_with_embedding_table


def test_exact_counts_do_not_drift():
    assert _count("deepseek-v3").total == 671_026_404_352
    assert _count("deepseek-v3").mtp == 11_610_067_968          # one MoE block + M_k (2d x d) + 3 RMSNorms
    assert _count("deepseek-v2").mtp == 0


def test_every_preset_counts():
    for preset in list_presets():
        c = _count(preset)
        assert 0 < c.activated < c.total


# One subprocess (megatron's CPU shim patches process state) builds each variant and prints sum(p.numel()).
_MEGATRON_COUNT = r"""
import json, sys
from training.config import resolve_stage_config
from training.parallel.setup import init_distributed, shutdown
variants = json.loads(sys.argv[1])
init_distributed(resolve_stage_config("pretrain", "tiny").parallel, seed=1)
from training.model.build import build_gpt
out = []
for overrides in variants:
    cfg = resolve_stage_config("pretrain", "tiny", overrides=overrides)
    gpt, _ = build_gpt(cfg.model, cfg.parallel)
    out.append(sum(p.numel() for p in gpt.parameters()))
print("COUNTS " + json.dumps(out), flush=True)
shutdown()
"""

VARIANTS = [
    [],                                                   # tiny as shipped: MLA with q LoRA, MoE, MTP
    ["model.mtp_num_layers=0"],                           # without MTP
    ["model.mtp_num_layers=2", "model.q_lora_rank=null"],  # plain q projection (V2-Lite style), MTP depth 2
    ["model.multi_latent_attention=false", "model.mtp_num_layers=0", "model.moe_router_num_groups=null",
     "model.moe_router_group_topk=null"],                 # standard attention (DeepSeekMoE 16B style)
    ["model.num_experts=null", "model.mtp_num_layers=1"],  # dense model
]


def test_counter_equals_megatron_core_exactly():
    proc = subprocess.run([sys.executable, "-c", _MEGATRON_COUNT, json.dumps(VARIANTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS "))
    megatron = json.loads(line[len("COUNTS "):])
    ours = [_count("tiny", v).total_with_mtp for v in VARIANTS]
    assert ours == megatron
    assert ours[0] != ours[1]   # the MTP block is really counted


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_params_cli_prints_total_activated_and_mtp():
    proc = _cli("params", "--preset", "deepseek-v3")
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith(" ")}
    assert lines["total"].startswith("total     671.03 B")
    assert lines["activated"].split()[1:3] == ["36.63", "B"]
    assert lines["mtp"].split()[1:3] == ["11.61", "B"]
    without_mtp = _cli("params", "--preset", "deepseek-v2")
    assert without_mtp.returncode == 0 and "\nmtp " not in without_mtp.stdout


def test_plan_matches_hand_computed_values():
    p = plan(1e20)
    # log10(C) = 20: B = 0.2920 x 10^(20 x 0.3271), η = 0.3118 x 10^(-2.5), M = 0.1715 x 10^10.486, D = 5.8316 x 10^9.514
    assert p.batch_tokens == pytest.approx(0.2920 * 10 ** 6.542, rel=1e-9)       # ≈ 1.017e6 tokens
    assert p.learning_rate == pytest.approx(0.3118 / 10 ** 2.5, rel=1e-9)        # ≈ 9.860e-4
    assert p.batch_tokens == pytest.approx(1.0173e6, rel=1e-3)
    assert p.learning_rate == pytest.approx(9.860e-4, rel=1e-3)
    assert p.model_flops_per_token * p.data_tokens == pytest.approx(1e20, rel=1e-3)   # C = M·D


# DeepSeek LLM Table 2 sets its two models' batch size and learning rate from eq. (1), so the fitted constants must
# give them back: 7B (30 layers, d 4096) and 67B (95 layers, d 8192, GQA with 8 of 64 heads for K/V, FFN 22016),
# both 2T tokens at sequence length 4096, with M from §3.2 eq. (2) (6 x non-embedding parameters + 12 n d l).
@pytest.mark.parametrize("layers, attention, ffn, d, batch, lr", [
    (30, 4.0, 3 * 11008, 4096, 2304, 4.2e-4),      # 7B:  Table 2 batch 2304 sequences, lr 4.2e-4
    (95, 2.25, 3 * 22016, 8192, 4608, 3.2e-4),     # 67B: Table 2 batch 4608 sequences, lr 3.2e-4
])
def test_plan_gives_back_deepseek_llm_table_2(layers, attention, ffn, d, batch, lr):
    flops_per_token = 6 * layers * (attention * d * d + ffn * d) + 12 * layers * d * 4096
    p = plan(flops_per_token * 2e12)
    assert p.batch_tokens / 4096 == pytest.approx(batch, rel=0.05)   # the paper rounds to whole multiples of 256
    assert p.learning_rate == pytest.approx(lr, rel=0.015)


def test_plan_cli_prints_every_quantity_and_sizes_a_preset():
    proc = _cli("plan", "--compute", "1e20", "--preset", "deepseek-moe-16b")
    assert proc.returncode == 0, proc.stderr
    values = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines()}
    assert float(values["batch_size"]) == pytest.approx(1.017e6, rel=1e-3)
    assert float(values["learning_rate"]) == pytest.approx(9.86e-4, rel=1e-3)
    assert {"model_scale", "data_scale", "preset_tokens", "preset_batch", "preset_steps"} <= set(values)


def test_non_embedding_flops_reduce_to_deepseek_llm_formula_for_a_dense_model():
    # DeepSeek LLM §3.2: M = 72 n d^2 + 12 n d l for a dense model with 4d^2 attention and an 8d^2 FFN (ignoring norms).
    n, d, seq = 2, 64, 128
    m = resolve_stage_config("pretrain", "tiny", overrides=[
        f"model.num_layers={n}", f"model.hidden_size={d}", "model.num_attention_heads=4", f"model.ffn_hidden_size={8 * d // 3}",
        "model.multi_latent_attention=false", "model.num_experts=null", "model.mtp_num_layers=0"]).model
    norms = 6 * (2 * n * d + d)
    assert non_embedding_flops_per_token(m, seq) - norms == 6 * n * (4 * d * d + 3 * d * (8 * d // 3)) + 12 * n * d * seq


@pytest.mark.parametrize("args, needle", [
    (("plan", "--compute", "0"), "--compute"),
    (("plan", "--compute", "-1e20"), "--compute"),
    (("plan", "--compute", "nan"), "--compute"),
    (("plan", "--compute", "1e20", "--preset", "nope"), "--preset nope"),
    (("params", "--preset", "nope"), "--preset nope"),
])
def test_bad_input_exits_2_naming_the_argument(args, needle):
    proc = _cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr


def test_stage_commands_still_work():
    proc = _cli("pretrain", "--preset", "deepseek-v2", "--dry-run")
    assert proc.returncode == 0 and "moe_device_limit: 3" in proc.stdout
    assert not math.isnan(plan(1.0).batch_tokens)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_dry_runs(preset):
    proc = _cli("pretrain", "--preset", preset, "--dry-run")
    assert proc.returncode == 0, proc.stderr
