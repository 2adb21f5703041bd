"""The GPU check of issue 19, one prepared run for one Hopper GPU (an H100 or H200), in under 8 minutes:

  1. `pytest -m gpu`: the GPU tests (the pretrain stage on the GPU against the CPU, in fp32, bf16, bf16 with
     grouped experts and FP8; torch's blockwise scaled_mm against the CPU emulation; grouped_mm's experts);
  2. a ~1.3B-parameter DeepSeek-V3-shaped MoE (the V3 preset's MLA, 1 shared + 64 fine-grained routed experts, top-6
     in 8 groups, sigmoid routing with bias balancing, MTP; 12 layers of hidden 1024; ~0.3B activated per token)
     trained on one GPU by the pretrain stage, on synthetic patterned tokens of the 129,280-token vocabulary:
       - bf16, sequential experts (megatron-core's SequentialMLP), the baseline;
       - bf16, grouped experts (`parallel.moe_grouped_gemm`: torch._grouped_mm);
       - fp8 (`train.precision: fp8`: V3's blockwise FP8 GEMMs through torch's scaled_mm), sequential experts.
     It prints each run's tokens/s (the mean over the second half of the steps), model FLOPs utilisation (the
     MLA+MoE formula of training/model/params.py against --peak-tflops), peak GPU memory, and final loss (the mean of
     the last 10% of steps), then the ratios to the baseline: FP8's tokens/s (issue 19's target: at least 1.3x
     BF16's) and its relative loss gap to BF16 (V3 §3.3: under 0.25%).

    .venv/bin/python benchmarks/gpu.py [--steps 300] [--grouped-steps 60] [--out DIR] [--skip-tests]

Every number comes from the runs' MLflow stores (`{out}/{run}/mlflow.db`); the logs are beside them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from fp8 import V3_GAP, final, losses  # noqa: E402
from stage_runs import stage  # noqa: E402

H200_BF16_TFLOPS = 989.0   # H100/H200 SXM dense BF16 tensor-core peak (NVIDIA's datasheet); MFU is against BF16's
FP8_SPEEDUP_TARGET = 1.3   # issue 19's target for FP8's tokens/s over BF16's

# The V3 preset's architecture and recipe, scaled to one GPU (the rest, MLA's head dimensions, the router, MTP and
# the optimizer, stays the preset's).
MODEL = ["model.num_layers=12", "model.hidden_size=1024", "model.num_attention_heads=16",
         "model.ffn_hidden_size=4096", "model.q_lora_rank=512", "model.kv_lora_rank=256", "model.num_experts=64",
         "model.moe_router_topk=6", "model.moe_ffn_hidden_size=384", "model.first_k_dense_layers=1"]
ONE_GPU = ["parallel.pipeline_model_parallel_size=1", "parallel.decoder_first_pipeline_num_layers=null",
           "parallel.decoder_last_pipeline_num_layers=null", "parallel.expert_model_parallel_size=1",
           "train.batch_size_rampup=null", "train.seq_length=2048", "train.micro_batch_size=4",
           "train.global_batch_size=8", "train.log_interval=10", "optimizer.warmup_steps=30",
           "train.fp8_shadow_interval=50"]
RUNS = {   # name: (overrides, which step count)
    "bf16-sequential": (["train.precision=bf16"], "steps"),
    "bf16-grouped": (["train.precision=bf16", "parallel.moe_grouped_gemm=true"], "grouped_steps"),
    "fp8-sequential": (["train.precision=fp8"], "steps"),
}


def metric_tail(root: Path, name: str) -> float:
    """The mean of a logged metric over the second half of its logged steps (past warm-up and compilation)."""
    curve = losses(root, name)
    steps = sorted(curve)[len(curve) // 2:]
    return sum(curve[s] for s in steps) / len(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of the bf16 and fp8 runs (the loss gap)")
    parser.add_argument("--grouped-steps", type=int, default=60, help="steps of the grouped run (throughput only)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-gpu")
    parser.add_argument("--skip-tests", action="store_true", help="skip `pytest -m gpu`")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    if not args.skip_tests:
        started = time.time()
        tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                "-n", "0"], cwd=REPO)
        print(f"pytest -m gpu: exit {tests.returncode}, {time.time() - started:.0f} s", flush=True)

    from training.data.synthetic import write_synthetic_curate

    out = args.out.resolve()
    corpus = out / "corpus"
    if not (corpus / "curate" / "manifest.json").is_file():
        write_synthetic_curate(corpus, vocab_size=129280, documents=20000)
    results = {}
    for name, (overrides, steps_field) in RUNS.items():
        root, steps = out / name, getattr(args, steps_field)
        seconds = stage("pretrain", root, f"tracking.uri=sqlite:///{root}/mlflow.db",
                        f"data_manifest={corpus / 'curate'}", f"train.steps={steps}",
                        f"train.save_interval={steps}", f"train.peak_flops_per_device={args.peak_tflops * 1e12}",
                        "seed=1", *MODEL, *ONE_GPU, *overrides, preset="deepseek-v3")
        results[name] = {"tokens_per_s": metric_tail(root, "tokens_per_s"), "mfu": metric_tail(root, "mfu"),
                         "peak_gib": max(losses(root, "gpu_peak_memory_gib").values()),
                         "loss": final(losses(root)), "steps": steps, "seconds": seconds}
        r = results[name]
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, peak {r['peak_gib']:.1f} GiB, "
              f"final loss {r['loss']:.4f} ({steps} steps, {seconds:.0f} s)", flush=True)
    base, grouped, fp8 = (results[n] for n in RUNS)
    gap = (fp8["loss"] - base["loss"]) / base["loss"]
    speedup = fp8["tokens_per_s"] / base["tokens_per_s"]
    print(f"grouped / sequential experts (bf16): {grouped['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s",
          flush=True)
    print(f"fp8 / bf16: {speedup:.2f}x tokens/s ({'meets' if speedup >= FP8_SPEEDUP_TARGET else 'misses'} the "
          f"{FP8_SPEEDUP_TARGET}x target); relative loss gap {100 * gap:+.3f}% after {args.steps} steps "
          f"({'within' if abs(gap) < V3_GAP else 'NOT within'} V3's 0.25%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
