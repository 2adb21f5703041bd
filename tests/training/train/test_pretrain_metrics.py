"""Pretrain metrics end to end (subprocess runs of the tiny model on synthetic data): expert load, MaxVio, expert-bias
norms, FLOPs/MFU, token-scheduled γ / λ / lr, the expert-load heatmap; and that aux-loss-free balancing balances."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.micro import TOKENS_PER_STEP, history as _history, mlflow_run as _run, pretrain, write_corpus


@pytest.mark.slow
def test_pretrain_logs_moe_metrics_schedules_and_heatmap(tmp_path):
    write_corpus(tmp_path)
    switch = 3 * TOKENS_PER_STEP   # γ → 0 and λ → 0.1 from step 4 on; multi-step lr drops at 80% / 90% of tokens
    out = pretrain(tmp_path, 6, "--set", "train.log_interval=3", "--set", "train.save_interval=100",
                   "--set", "optimizer.decay_style=multi-step", "--set", "train.peak_flops_per_device=1e11",
                   "--set", f"model.moe_router_bias_update_until_tokens={switch}",
                   "--set", f"model.mtp_loss_scaling_switch_tokens={switch}",
                   "--set", "model.mtp_loss_scaling_factor_after=0.1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run = _run(tmp_path)
    metrics = run.data.metrics
    # tiny: layer 1 is dense, layers 2-3 and the MTP module are MoE with 8 routed experts
    for label in ("layer2", "layer3", "mtp0"):
        assert 0 <= metrics[f"moe/maxvio/{label}"] < 8
        loads = [metrics[f"moe/load/{label}/expert{e}"] for e in range(8)]
        assert sum(loads) == pytest.approx(4 * TOKENS_PER_STEP)   # mean per step; top-4: each token counts 4 times
        assert f"moe/expert_bias_norm/{label}" in metrics
    assert {"moe/maxvio", "moe/expert_bias_norm", "mfu", "model_tflops_per_s", "tokens_per_s", "lm_loss",
            "mtp_loss", "grad_norm", "lr"} <= set(metrics)
    assert 0 < metrics["mfu"] < 1

    assert _history(client, run, "moe/bias_update_rate") == {3: 1e-3, 6: 0.0}
    assert _history(client, run, "mtp_loss_weight") == {3: 0.3, 6: 0.1}
    norms = _history(client, run, "moe/expert_bias_norm/layer3")
    assert norms[6] == pytest.approx(norms[3])   # γ = 0 from step 4: the biases no longer move
    lr = _history(client, run, "lr")
    assert lr[3] == pytest.approx(3e-3) and lr[6] == pytest.approx(3e-4)   # after 90% of the tokens: 10% of peak

    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "moe")]
    assert artifacts == ["moe/expert_load_heatmap.png"]
    png = (tmp_path / "pretrain" / "expert_load_heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def _maxvio_curve(tmp_path, *extra):
    write_corpus(tmp_path)
    # one thread each: the two runs go side by side on a 2-core machine
    out = pretrain(tmp_path, 100, "--set", "train.log_interval=10", "--set", "train.save_interval=1000", *extra,
                   env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, run = _run(tmp_path)
    return _history(client, run, "moe/maxvio")


@pytest.mark.extended   # a "learns" claim (two 100-step runs); the bias update's rule is checked on fixed tensors in
def test_aux_loss_free_balancing_lowers_maxvio(tmp_path):   # tests/training/model/test_moe_mechanisms.py
    """The same 100 steps with γ = 1e-3 and with γ = 0: the biases must lower the final MaxVio (mean of the last
    three 10-step windows, across the MoE layers and the MTP module)."""
    with ThreadPoolExecutor(2) as pool:
        balanced = pool.submit(_maxvio_curve, tmp_path / "gamma")
        unbalanced = pool.submit(_maxvio_curve, tmp_path / "no-gamma", "--set", "model.moe_router_bias_update_rate=0")
        balanced, unbalanced = balanced.result(), unbalanced.result()
    print(f"MaxVio per 10-step window, γ=1e-3: {balanced}\nγ=0: {unbalanced}")

    def final(curve):
        return sum(curve[s] for s in (80, 90, 100)) / 3

    assert final(balanced) < final(unbalanced), (balanced, unbalanced)
