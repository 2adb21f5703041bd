"""Expert load and MaxVio with DeepSeek-V2 routing: `DeepSeekV2Router.load_counts` (counted in training with grad
only, before token dropping, not checkpointed) read and zeroed by `metrics.ExpertLoadTracker`, and logged to MLflow by
the pretrain stage like the V3 path's.

The router-level checks need megatron-core under the CPU shim (process-global state): they run once in a subprocess
(this file as a script, `python test_v2_router_load.py probe`), which prints one JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# Tiny preset with V2 routing: 8 experts on 4 emulated devices, top-4 within M = 2 devices, capacity factor 1.0 (so
# tokens are dropped: the counts must be the router's choices before dropping).
V2_SETS = ["train.log_interval=1", "train.save_interval=100", "model.moe_router_type=deepseek_v2",
           "model.moe_num_devices=4", "model.moe_device_limit=2", "model.moe_token_drop_capacity_factor=1.0"]
TOP_K, EXPERTS = 4, 8   # tiny.yaml


def _probe() -> dict:
    import torch

    from training.config import ModelConfig, ParallelConfig
    from training.parallel.setup import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from training.metrics import ExpertLoadTracker
    from training.model.build import transformer_config
    from training.model.routers import DeepSeekV2Router, V2RoutingSettings

    pg = get_default_pg_collection()
    v2_cfg = transformer_config(ModelConfig(vocab_size=128, num_experts=4, moe_router_topk=1,
                                            moe_router_type="deepseek_v2"), ParallelConfig(),
                                use_cpu_initialization=True)
    drop = V2RoutingSettings(num_devices=2, device_limit=None, aux_loss_coeffs=(0.0, 0.0, 0.0), capacity_factor=1.0)
    v2 = DeepSeekV2Router(config=v2_cfg, pg_collection=pg, settings=drop)
    v2.set_layer_number(2)
    v3_model = ModelConfig(vocab_size=128, num_experts=4, moe_router_topk=1, moe_router_num_groups=None,
                           moe_router_group_topk=None)
    v3_cfg = transformer_config(v3_model, ParallelConfig(), use_cpu_initialization=True)
    v3 = TopKRouter(v3_cfg, pg_collection=pg)
    v3.set_layer_number(3)
    tracker = ExpertLoadTracker(torch.nn.ModuleList([v2, v3]))

    # 4 tokens all choose expert 0; capacity 1.0·4·1/2 = 2 on its device: training drops two of them.
    crowd = torch.tensor([[4.0, 0, 0, 0], [3.0, 0, 0, 0], [5.0, 0, 0, 0], [3.5, 0, 0, 0]]).view(4, 1, 4)
    out: dict = {"labels": [label for label, *_ in tracker.routers], "state_dict": list(v2.state_dict())}
    v2.train()
    _, kept = v2.routing(crowd.clone().requires_grad_())
    out["kept"], out["after_train"] = kept.sum(dim=0).tolist(), v2.load_counts.tolist()
    with torch.no_grad():
        v2.routing(crowd.clone())
    out["after_no_grad"] = v2.load_counts.tolist()
    v2.eval()
    v2.routing(crowd.clone().requires_grad_())
    out["after_eval"] = v2.load_counts.tolist()
    v2.train()
    v2.routing(crowd.clone().requires_grad_(), padding_mask=torch.tensor([[True], [False], [False], [False]]))
    out["with_padding"] = v2.load_counts.tolist()
    v3.routing(crowd.clone().requires_grad_())   # megatron counts into local_tokens_per_expert
    tracker.snapshot()
    out["snapshot"] = tracker.window[-1].tolist()
    out["v2_after_snapshot"], out["v3_after_snapshot"] = v2.load_counts.tolist(), v3.local_tokens_per_expert.tolist()
    loads, norms = tracker.collect()
    out["collected"], out["norms"] = {k: v.tolist() for k, v in loads.items()}, sorted(norms)
    return out


@pytest.fixture(scope="module")
def probe():
    from tests.support.processes import run_probe   # here, not at the top: this file also runs as the probe script

    return run_probe(__file__)


def test_v2_router_counts_choices_before_dropping_in_training_only(probe):
    assert probe["kept"] == [2, 0, 0, 0]                      # two of the four tokens dropped ...
    assert probe["after_train"] == [4, 0, 0, 0]               # ... but the router chose expert 0 four times
    assert probe["after_no_grad"] == probe["after_eval"] == [4, 0, 0, 0]   # no-grad and eval forwards don't count
    assert probe["with_padding"] == [7, 0, 0, 0]              # the padding token is not counted
    assert "load_counts" not in probe["state_dict"]           # not persistent: checkpoints are unchanged


def test_tracker_reads_and_zeroes_v2_counts_and_leaves_v3_to_megatron(probe):
    assert probe["labels"] == ["layer2", "layer3"]
    assert probe["snapshot"] == [[7, 0, 0, 0], [4, 0, 0, 0]]
    assert probe["v2_after_snapshot"] == [0, 0, 0, 0]         # nothing else zeroes V2's counts
    assert probe["v3_after_snapshot"] == [4, 0, 0, 0]         # finalize_model_grads zeroes megatron's
    assert probe["collected"] == {"layer2": [[7, 0, 0, 0]], "layer3": [[4, 0, 0, 0]]}
    assert probe["norms"] == ["layer3"]                       # bias norms only where there is an expert bias


@pytest.mark.slow
def test_pretrain_with_v2_routing_logs_balance_losses_expert_load_maxvio_and_heatmap(tmp_path):
    from tests.support.micro import TOKENS_PER_STEP, history as _history, mlflow_run, pretrain, write_corpus

    write_corpus(tmp_path)
    out = pretrain(tmp_path, 2, *[arg for item in V2_SETS for arg in ("--set", item)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run = mlflow_run(tmp_path)
    metrics = run.data.metrics
    vios = []
    for label in ("layer2", "layer3", "mtp0"):   # layer 1 is dense; the MTP module's MoE routes like the rest
        for step in (1, 2):
            loads = [_history(client, run, f"moe/load/{label}/expert{e}")[step] for e in range(EXPERTS)]
            # every token's top-K choices, before the capacity-factor drop: exactly K assignments per token per step
            assert sum(loads) == TOP_K * TOKENS_PER_STEP, (label, step, loads)
            mean = sum(loads) / EXPERTS
            assert _history(client, run, f"moe/maxvio/{label}")[step] == pytest.approx((max(loads) - mean) / mean)
        vios.append(metrics[f"moe/maxvio/{label}"])
        assert 0 <= vios[-1] < EXPERTS - 1
    assert metrics["moe/maxvio"] == pytest.approx(sum(vios) / len(vios))
    assert not any(key.startswith("moe/expert_bias_norm") for key in metrics)   # V2 has no expert bias
    for name in ("expert_balance_loss", "device_balance_loss", "comm_balance_loss"):   # V2 eq. 12, 15, 18
        assert 0 < metrics[name] < 10, (name, metrics)
    assert "seq_load_balancing_loss" not in metrics          # megatron's own V3 loss is off on this path
    print(f"V2 MaxVio at step 2: {metrics['moe/maxvio']:.4f} {dict(zip(('layer2', 'layer3', 'mtp0'), vios))}")

    assert [a.path for a in client.list_artifacts(run.info.run_id, "moe")] == ["moe/expert_load_heatmap.png"]
    assert (tmp_path / "pretrain" / "expert_load_heatmap.png").read_bytes().startswith(b"\x89PNG")


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    sys.path.insert(0, str(REPO))
    print(json.dumps(_probe()), flush=True)
