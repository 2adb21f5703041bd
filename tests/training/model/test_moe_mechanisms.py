"""MoE mechanisms on fixed tensors, against the papers' equations computed by hand.

DeepSeek-V3 (arXiv:2412.19437) through megatron-core's own router, as `training.model.build` configures it: sigmoid
gating, node(group)-limited top-K, expert bias (selection only), the bias update, the sequence-wise balance loss and the
MTP loss weight. DeepSeek-V2 (arXiv:2405.04434) through our `training.model.routers`: device-limited routing, the
expert-, device- and communication-level balance losses, token dropping in training only.

megatron's pieces need the CPU shim, which changes process-global state: they run once, in a subprocess (this file
run as a script, `python test_moe_mechanisms.py probe`), which prints one JSON line; the tests compare it with hand
computations done here in plain torch.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from training.model.routers import balance_losses, device_limited_topk, device_token_drop  # noqa: E402


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# V3 case: 12 experts in 4 groups of 3, K_r = 4 experts per token, M = 2 groups. Affinities s (sigmoid):
#   G0 = e0..e2: .95 .10 .10 | G1 = e3..e5: .60 .55 .50 | G2 = e6..e8: .90 .20 .15 | G3 = e9..e11: .58 .50 .05
# Group score = sum of its top K_r/M = 2 affinities: G0 1.05, G1 1.15, G2 1.10, G3 1.08 -> G1 and G2 are selected,
# although G0 holds the strongest expert (e0). Plain top-4 (e0 e6 e3 e9) would touch all four groups.
V3_AFFINITY = [0.95, 0.10, 0.10, 0.60, 0.55, 0.50, 0.90, 0.20, 0.15, 0.58, 0.50, 0.05]
V3_EXPECTED = {6: 0.90, 3: 0.60, 4: 0.55, 5: 0.50}          # top-4 of G1 ∪ G2, weights s / Σ selected s
# With bias b_1 = +1: G0's biased top-2 sum is .95 + 1.10 = 2.05 -> G0 and G1; top-4 of biased s there: e1 e0 e3 e4;
# the weights still come from the unbiased s (V3 eq. 13, 16): e1 gets .10 / 2.20, not 1.10 / 3.20.
V3_BIASED_EXPECTED = {1: 0.10, 0: 0.95, 3: 0.60, 4: 0.55}
GAMMA = 1e-3
BIAS_LOAD = [[10, 2, 6, 6]]    # tokens per expert; mean 6 -> overloaded e0 -γ, underloaded e1 +γ, at the mean 0


# ---------------------------------------------------------------------------------------------------- the probe --
def _v3_config(**overrides):
    from training.config import ModelConfig, ParallelConfig
    from training.model.build import transformer_config

    model = ModelConfig(vocab_size=128, **overrides)
    return model, transformer_config(model, ParallelConfig(), use_cpu_initialization=True)


def _probe() -> dict:
    """Everything that needs megatron-core, run under the CPU shim in one process."""
    import functools

    from training.config import ParallelConfig
    from training.parallel.setup import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, get_updated_expert_bias
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    out: dict = {}
    pg = get_default_pg_collection()
    tracker = get_moe_layer_wise_logging_tracker()

    # (a, b) V3 gating + group-limited routing through megatron's TopKRouter, configured by our build.py.
    _, cfg = _v3_config(num_experts=12, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2)
    router = TopKRouter(cfg, pg_collection=pg)
    logits = torch.tensor([[[_logit(p) for p in V3_AFFINITY]]])          # [seq 1, batch 1, experts 12]
    with torch.no_grad():
        probs, routing_map = router.routing(logits.clone())
        out["v3_probs"], out["v3_map"] = probs[0].tolist(), routing_map[0].tolist()
        router.expert_bias.zero_()[1] = 1.0
        probs, routing_map = router.routing(logits.clone())
        out["v3_biased_probs"], out["v3_biased_map"] = probs[0].tolist(), routing_map[0].tolist()

    # (c) the bias update megatron runs in finalize_model_grads, on a router that has counted its tokens.
    out["bias_update"] = get_updated_expert_bias(torch.tensor(BIAS_LOAD, dtype=torch.float32),
                                                 torch.zeros(1, 4), GAMMA).tolist()
    _, cfg = _v3_config(num_experts=4, moe_router_topk=1, moe_router_num_groups=None, moe_router_group_topk=None,
                        moe_router_bias_update_rate=GAMMA)
    router = TopKRouter(cfg, pg_collection=pg)
    loads = BIAS_LOAD[0]
    one_hot = torch.cat([torch.eye(4)[e].repeat(n, 1) for e, n in enumerate(loads)]) * 5.0
    router.routing(one_hot.view(-1, 1, 4).requires_grad_())          # grad mode: local_tokens_per_expert counts
    out["routed_counts"] = router.local_tokens_per_expert.tolist()
    _update_router_expert_bias([torch.nn.ModuleList([router])], cfg)
    out["bias_after_finalize"] = router.expert_bias.tolist()

    # (d) V3 sequence-wise balance loss (α = tiny's 1e-4), logged value = L_Bal / α.
    _, cfg = _v3_config(num_experts=8, moe_router_topk=2)
    router = TopKRouter(cfg, pg_collection=pg)
    router.set_layer_number(1)
    seq_logits = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(1))
    out["seq_logits"] = seq_logits.tolist()
    tracker.clear()
    router.routing(seq_logits.clone().requires_grad_())
    out["seq_aux_loss"] = tracker["seq_load_balancing_loss"]["values"][0].item()

    # (e) our DeepSeek-V2 router: the three losses in training, token dropping in training only.
    from training.model.routers import DeepSeekV2Router, LOSS_NAMES, V2RoutingSettings

    _, cfg = _v3_config(num_experts=8, moe_router_topk=3, moe_router_type="deepseek_v2")
    settings = V2RoutingSettings(num_devices=4, device_limit=2, aux_loss_coeffs=(0.003, 0.05, 0.02),
                                 capacity_factor=None)
    router = functools.partial(DeepSeekV2Router, settings=settings)(config=cfg, pg_collection=pg)
    router.set_layer_number(1)
    v2_logits = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(2))
    out["v2_logits"] = v2_logits.tolist()
    tracker.clear()
    leaf = v2_logits.clone().requires_grad_()
    probs, routing_map = router.routing(leaf)
    out["v2_losses"] = {name: tracker[name]["values"][0].item() for name in LOSS_NAMES}
    out["v2_probs"], out["v2_map"] = probs.tolist(), routing_map.tolist()
    probs.sum().backward()        # the attached losses reach the gate: d(probs.sum)/dlogits + α-weighted loss grads
    out["v2_logits_grad"] = leaf.grad.tolist()

    drop = V2RoutingSettings(num_devices=2, device_limit=None, aux_loss_coeffs=(0.0, 0.0, 0.0), capacity_factor=1.0)
    _, cfg = _v3_config(num_experts=4, moe_router_topk=1, moe_router_type="deepseek_v2")
    router = DeepSeekV2Router(config=cfg, pg_collection=pg, settings=drop)
    crowd = torch.tensor([[4.0, 0, 0, 0], [3.0, 0, 0, 0], [5.0, 0, 0, 0], [3.5, 0, 0, 0]]).view(4, 1, 4)
    router.train()
    out["drop_train_map"] = router.routing(crowd.clone())[1].tolist()
    router.eval()
    out["drop_eval_map"] = router.routing(crowd.clone())[1].tolist()

    # (f) MTP: the gradient megatron's MTP adds equals that of λ/D Σ_k L_MTP^k (V3 eq. 25), L_k = logged losses.
    out["mtp"] = _mtp_probe()
    return out


def _mtp_probe() -> dict:
    from megatron.core.transformer import multi_token_prediction as mtp_mod

    from training.config import ModelConfig, ParallelConfig
    from training.model.build import build_gpt

    depth, lam = 2, 0.3
    # No MoE balance loss here: it would reach the gate through the MTP modules' MoE layers and blur the comparison.
    gpt, _ = build_gpt(ModelConfig(vocab_size=128, mtp_num_layers=depth, mtp_loss_scaling_factor=lam,
                                   moe_aux_loss_coeff=0.0),
                       ParallelConfig())
    attached = []
    original = mtp_mod.MTPLossAutoScaler.apply

    def capture(hidden, loss):
        attached.append(loss)
        return original(hidden, loss)

    mtp_mod.MTPLossAutoScaler.apply = capture
    import megatron.core.models.gpt.gpt_model as gpt_model_mod
    gpt_model_mod.MTPLossAutoScaler.apply = capture
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    params = [p for p in gpt.parameters() if p.requires_grad]

    def forward():   # megatron's cross entropy backward works in place: one backward per forward
        attached.clear()
        per_token = gpt(tokens[:, :-1], torch.arange(16).unsqueeze(0), None, labels=tokens[:, 1:])
        return per_token.float().mean()

    def grads(loss, scale):
        mtp_mod.MTPLossAutoScaler.set_loss_scale(torch.tensor(scale))
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(got, params)])

    with_mtp = grads(forward(), 1.0)
    logged = mtp_mod.MTPLossLoggingHelper.tracker["values"].tolist()
    lm_only = grads(forward(), 0.0)
    forward()
    extra = sum(a.sum() for a in attached)
    explicit = grads(extra, 1.0)
    return {"depth": depth, "lambda": lam, "logged_per_depth": logged, "attached_total": extra.item(),
            "mtp_grad_norm": explicit.norm().item(),
            "rel_gap": ((with_mtp - lm_only - explicit).norm() / explicit.norm()).item()}


@pytest.fixture(scope="module")
def mcore():
    from tests.support.processes import run_probe   # here, not at the top: this file also runs as the probe script

    return run_probe(__file__)


# ------------------------------------------------------------------------------------------------- V3 (megatron) --
def _selected(row) -> dict:
    return {i: w for i, w in enumerate(row) if w}


def test_v3_sigmoid_gating_selects_in_top_groups_and_normalises_over_selected(mcore):
    assert [i for i, on in enumerate(mcore["v3_map"]) if on] == sorted(V3_EXPECTED)
    total = sum(V3_EXPECTED.values())
    probs = _selected(mcore["v3_probs"])
    assert probs.keys() == V3_EXPECTED.keys()
    for e, s in V3_EXPECTED.items():                        # g_{i,t} = s_{i,t} / Σ_{j selected} s_{j,t}  (eq. 13)
        assert probs[e] == pytest.approx(s / total, rel=1e-5)
    assert sum(probs.values()) == pytest.approx(1.0)


def test_v3_group_limited_routing_differs_from_plain_topk(mcore):
    plain = sorted(range(12), key=lambda e: -V3_AFFINITY[e])[:4]
    assert len({e // 3 for e in plain}) == 4                 # plain top-K would reach every group
    chosen = [e for e, on in enumerate(mcore["v3_map"]) if on]
    assert {e // 3 for e in chosen} == {1, 2}                # ≤ M groups, ranked by the sum of their top K_r/M
    assert 0 not in chosen                                   # the single best expert's group lost on that sum


def test_v3_expert_bias_changes_selection_not_weights(mcore):
    probs = _selected(mcore["v3_biased_probs"])
    assert probs.keys() == V3_BIASED_EXPECTED.keys()
    total = sum(V3_BIASED_EXPECTED.values())
    for e, s in V3_BIASED_EXPECTED.items():
        assert probs[e] == pytest.approx(s / total, rel=1e-5)


def test_v3_bias_update_sign_and_magnitude(mcore):
    assert mcore["bias_update"] == [[pytest.approx(-GAMMA), pytest.approx(GAMMA), 0.0, 0.0]]
    assert mcore["routed_counts"] == [float(n) for n in BIAS_LOAD[0]]   # counted while routing in training
    assert mcore["bias_after_finalize"] == [pytest.approx(-GAMMA), pytest.approx(GAMMA), 0.0, 0.0]


def test_v3_sequence_wise_balance_loss_by_hand(mcore):
    """V3 eq. 17-20: L_Bal = α Σ_i f_i P_i per sequence, f_i = N_r/(K_r T) Σ_t 1(s_{i,t} in TopK(s_t, K_r)),
    P_i = 1/T Σ_t s'_{i,t}, s' = s / Σ_j s_j; megatron averages the sequences of a micro-batch."""
    logits = torch.tensor(mcore["seq_logits"])              # [T=6, batch 2, N_r=8]
    n_r, k_r = 8, 2
    per_sequence = []
    for b in range(logits.shape[1]):
        s = torch.sigmoid(logits[:, b])
        s_norm = s / s.sum(dim=-1, keepdim=True)
        T = s.shape[0]
        total = 0.0
        for i in range(n_r):
            hits = sum(1 for t in range(T) if i in torch.topk(s[t], k_r).indices.tolist())
            f_i = n_r / (k_r * T) * hits
            P_i = s_norm[:, i].sum().item() / T
            total += f_i * P_i
        per_sequence.append(total)
    assert mcore["seq_aux_loss"] == pytest.approx(sum(per_sequence) / len(per_sequence), rel=1e-5)


def test_mtp_loss_weight_is_lambda_over_depth(mcore):
    """V3 eq. 25: L = L_main + λ/D Σ_k L_MTP^k. megatron attaches λ/D·L_k to the hidden states; the gradient it adds
    is exactly that of λ/D Σ_k L_k (and not zero)."""
    m = mcore["mtp"]
    assert len(m["logged_per_depth"]) == m["depth"]
    assert m["attached_total"] == pytest.approx(m["lambda"] / m["depth"] * sum(m["logged_per_depth"]), rel=1e-5)
    assert m["mtp_grad_norm"] > 0
    assert m["rel_gap"] < 1e-5                               # float32 summation order only


# ------------------------------------------------------------------------------------------- V2 (our router) --
def test_v2_device_limited_selection():
    # 3 devices of 2 experts, K = 3, M = 2. Device scores (max affinity): .30, .25, .24 -> devices 0 and 1; top-3 there
    # takes e3 (.02) although e4 (.24) is higher: plain top-3 (e0 e2 e4) would touch all three devices.
    s = torch.tensor([[0.30, 0.01, 0.25, 0.02, 0.24, 0.18]])
    assert device_limited_topk(s, 3, 3, 2)[0].nonzero().view(-1).tolist() == [0, 2, 3]
    assert device_limited_topk(s, 3, 3, None)[0].nonzero().view(-1).tolist() == [0, 2, 4]


def test_v2_balance_losses_worked_example():
    """4 experts on 2 devices (E_1 = {0, 1}, E_2 = {2, 3}), K = 2, M = 2, one sequence of T = 2 tokens:
    token 1 s = .4 .3 .2 .1 -> experts {0, 1}, device {1};  token 2 s = .1 .4 .3 .2 -> experts {1, 2}, devices {1, 2}.
    eq. 13: f = 4/(2·2)·[1, 2, 1, 0] = [1, 2, 1, 0];  eq. 14: P = [.25, .35, .25, .15];   Σ f P = 1.20
    eq. 16: f' = [1.5, .5];  eq. 17: P' = [.6, .4];                                       Σ f' P' = 1.10
    eq. 19: f'' = 2/(2·2)·[2, 1] = [1, .5];  eq. 20: P'' = P';                            Σ f'' P'' = 0.80"""
    s = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.4, 0.3, 0.2]])
    routing = device_limited_topk(s, 2, 2, 2)
    assert routing.tolist() == [[True, True, False, False], [False, True, True, False]]
    losses = balance_losses(s, routing, seq_length=2, topk=2, num_devices=2, device_limit=2)
    assert [x.item() for x in losses] == [pytest.approx(1.20), pytest.approx(1.10), pytest.approx(0.80)]


def _v2_by_hand(logits: torch.Tensor, topk: int, devices: int, limit: int):
    """V2 eq. 11-20 with loops: per sequence, then averaged over the batch (T = tokens of a sequence)."""
    seq, batch, n = logits.shape
    per_dev = n // devices
    sums = [0.0, 0.0, 0.0]
    for b in range(batch):
        s = torch.softmax(logits[:, b], dim=-1)
        selected = []
        for t in range(seq):
            best = sorted(range(devices), key=lambda d: -max(s[t, d * per_dev:(d + 1) * per_dev]))[:limit]
            allowed = [e for e in range(n) if e // per_dev in best]
            selected.append(sorted(allowed, key=lambda e: -s[t, e])[:topk])
        f = [n / (topk * seq) * sum(e in sel for sel in selected) for e in range(n)]
        P = [s[:, e].sum().item() / seq for e in range(n)]
        f_dev = [sum(f[d * per_dev:(d + 1) * per_dev]) / per_dev for d in range(devices)]
        P_dev = [sum(P[d * per_dev:(d + 1) * per_dev]) for d in range(devices)]
        f_comm = [devices / (limit * seq) * sum(any(e // per_dev == d for e in sel) for sel in selected)
                  for d in range(devices)]
        sums[0] += sum(a * b for a, b in zip(f, P))
        sums[1] += sum(a * b for a, b in zip(f_dev, P_dev))
        sums[2] += sum(a * b for a, b in zip(f_comm, P_dev))
    return [x / batch for x in sums], selected


def test_v2_router_losses_match_hand_computation(mcore):
    logits = torch.tensor(mcore["v2_logits"])              # [T=5, batch 2, 8 experts], 4 devices, K=3, M=2
    expected, _ = _v2_by_hand(logits, topk=3, devices=4, limit=2)
    logged = mcore["v2_losses"]                              # tracker values are L / α
    assert [logged[k] for k in ("expert_balance_loss", "device_balance_loss", "comm_balance_loss")] == [
        pytest.approx(x, rel=1e-5) for x in expected]


def test_v2_router_routes_to_at_most_m_devices_with_unnormalised_softmax_weights(mcore):
    logits = torch.tensor(mcore["v2_logits"]).view(-1, 8)
    s = torch.softmax(logits, dim=-1)
    probs, routing = torch.tensor(mcore["v2_probs"]), torch.tensor(mcore["v2_map"])
    assert (routing.sum(-1) == 3).all()
    assert (routing.view(-1, 4, 2).any(-1).sum(-1) <= 2).all()
    assert torch.allclose(probs, s * routing, atol=1e-6)    # g_{i,t} = s_{i,t} on the selected experts (V2 eq. 10)
    assert any(abs(x) > 0 for row in mcore["v2_logits_grad"] for col in row for x in col)


def test_v2_token_dropping_by_hand():
    # 4 tokens, all on expert 0 (device 0 of 2), K = 1: capacity 1.0·4·1/2 = 2 -> the two highest affinities stay.
    s = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2], [0.9, 0.0, 0.05, 0.05], [0.6, 0.2, 0.1, 0.1]])
    routing = device_limited_topk(s, 1, 2, None)
    keep = device_token_drop(s, routing, topk=1, num_devices=2, capacity_factor=1.0)
    assert keep[:, 0].tolist() == [True, False, True, False] and not keep[:, 1:].any()


def test_v2_router_drops_tokens_in_training_only(mcore):
    train, evaluate = torch.tensor(mcore["drop_train_map"]), torch.tensor(mcore["drop_eval_map"])
    assert evaluate[:, 0].all() and evaluate.sum() == 4
    assert train[:, 0].tolist() == [True, False, True, False]    # logits 4, 3, 5, 3.5: the two highest kept


def test_v2_config_implies_softmax_without_bias_and_checks_device_shapes():
    from pydantic import ValidationError

    from training.config import ModelConfig

    v2 = ModelConfig(moe_router_type="deepseek_v2", moe_num_devices=4, moe_device_limit=2)
    assert (v2.moe_router_score_function, v2.moe_router_enable_expert_bias) == ("softmax", False)
    assert ModelConfig().moe_router_type == "megatron" and ModelConfig().moe_router_score_function == "sigmoid"
    for bad in ({"moe_router_score_function": "sigmoid"}, {"moe_num_devices": 3},
                {"moe_num_devices": 4, "moe_device_limit": 5},
                {"moe_num_devices": 4, "moe_device_limit": 1, "moe_router_topk": 3},
                {"moe_aux_loss_coeffs": [0.1, 0.1]}):
        with pytest.raises(ValidationError):
            ModelConfig(moe_router_type="deepseek_v2", **bad)


# ------------------------------------------------------------------------------------ V2 router, end to end --
V2_OVERRIDES = ["model.moe_router_type=deepseek_v2", "model.moe_num_devices=4", "model.moe_device_limit=2",
                "model.moe_token_drop_capacity_factor=1.0"]


def _pretrain_v2(run_root: Path, nproc: int, *extra: str) -> dict:
    """The real pretrain stage (3 steps) with DeepSeek-V2 routing; returns its MLflow run's metrics."""
    from tests.support.micro import write_corpus
    from tests.support.mlflow_store import sqlite_store
    from tests.support.processes import repo_env, torchrun

    write_corpus(run_root)
    launcher = torchrun(nproc) if nproc > 1 else []
    sets = [f"run_root={run_root}", "train.steps=3", "train.save_interval=3",
            f"tracking.uri={sqlite_store(run_root)}", *V2_OVERRIDES, *extra]
    cmd = [sys.executable, "-W", "ignore", *launcher, "-m", "training", "pretrain", "--preset", "micro"]
    for item in sets:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=repo_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("seekflow").experiment_id])
    return {"metrics": run.data.metrics,
            "history": [m.value for m in client.get_metric_history(run.info.run_id, "lm_loss")]}


def _assert_v2_trained(result: dict) -> None:
    metrics = result["metrics"]
    for name in ("expert_balance_loss", "device_balance_loss", "comm_balance_loss"):
        assert name in metrics and 0 < metrics[name] < 10, (name, metrics)
    assert "seq_load_balancing_loss" not in metrics          # megatron's own V3 loss is off on this path
    assert len(result["history"]) == 3 and all(math.isfinite(x) for x in result["history"])


# One process with V2 routing: tests/training/test_v2_router_load.py (losses, expert load, MaxVio, heatmap).


@pytest.mark.slow
def test_v2_router_trains_with_expert_parallelism(tmp_path):
    # D = the 2 expert-parallel ranks; M = 1: each token's experts lie on one rank.
    _assert_v2_trained(_pretrain_v2(tmp_path, 2, "parallel.expert_model_parallel_size=2", "model.moe_num_devices=null",
                                    "model.moe_device_limit=1"))


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    print(json.dumps(_probe()), flush=True)
