"""Does the long_context stage extend the tiny profile's context? (issue 16, "Extension works on the tiny profile")

Per seed, through the real stages (`python -m training ...`, the tiny preset, one curated corpus for all seeds):
  parent     pretrain: 300 steps of 8 x 64 tokens (the preset)
  extension  long_context on the parent: the tiny preset's phase, YaRN s = 4 from 64 to 256 tokens, 60 steps
  ablation   the same phase with rope_scaling off (plain RoPE at 256 tokens), same seed, same data
Then the evaluate stage scores all three on 256-token windows of held-out text (the standard library's docstrings
and code), perplexity by prediction position, and on the passkey needle-in-a-haystack grid (context length x depth).

Printed per seed: perplexity on the positions beyond the original 64 tokens (64-256) for extension, parent and
ablation, the 0-64 bucket beside them, each model's NIAH grid, and the stage's wall time. The claim holds for a seed
when the extension's 64-256 perplexity is below both others'. Every number is printed; nothing is tuned here.

    .venv/bin/python benchmarks/long_context.py [--seeds 1 2 3] [--out runs/bench-long-context]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from stage_runs import stage  # noqa: E402

ORIGINAL, EXTENDED = 64, 256
EVALUATE = ["humaneval.enabled=false", "fim.enabled=false", "arith.enabled=false",
            f"perplexity.seq_length={EXTENDED}", "perplexity.position_buckets=[0,64,128,256]",
            "perplexity.max_documents=200", "perplexity.max_tokens=8192",
            "passkey.context_lengths=[80,128,192,248]", "passkey.depths=[0.0,0.25,0.5,0.75,1.0]", "passkey.trials=2"]
MODELS = ("extension", "parent", "ablation")


def beyond(metrics: dict, start: int = ORIGINAL) -> float:
    """Perplexity over every prediction at positions >= `start` (token-weighted over the buckets there)."""
    buckets = [(int(k.split("_")[1]), k[: -len("_nll")]) for k in metrics
               if k.startswith("perplexity.pos_") and k.endswith("_nll")]
    chosen = [name for first, name in buckets if first >= start]
    tokens = sum(metrics[f"{name}_tokens"] for name in chosen)
    return math.exp(sum(metrics[f"{name}_nll"] * metrics[f"{name}_tokens"] for name in chosen) / tokens)


def niah_rows(results: dict) -> list[str]:
    table = results["tables"]["niah/grid.json"]
    cells = {(n, d): a for n, d, a in zip(table["context_length"], table["depth"], table["accuracy"])}
    lengths, depths = sorted({n for n, _ in cells}), sorted({d for _, d in cells})
    rows = ["depth \\ tokens " + " ".join(f"{n:>5}" for n in lengths)]
    rows += [f"{100 * d:>13.0f}% " + " ".join(f"{cells[n, d]:>5.2f}" for n in lengths) for d in depths]
    return rows


def run_seed(seed: int, out: Path, corpus: Path) -> dict:
    root = out / f"seed{seed}"
    common = [f"seed={seed}", f"data_manifest={corpus}"]
    timings = {"pretrain": stage("pretrain", root, *common)}
    parent = root / "pretrain" / "release"
    timings["long_context"] = stage("long_context", root, *common)
    timings["ablation"] = stage("long_context", root, *common, "name=long_context_plain", "rope_scaling=false")
    releases = {"extension": root / "long_context" / "phase_0" / "release", "parent": parent,
                "ablation": root / "long_context_plain" / "phase_0" / "release"}
    scores = {}
    for model, release in releases.items():
        stage("evaluate", root, f"seed={seed}", f"name=evaluate_{model}", f"checkpoint={release}", *EVALUATE)
        results = json.loads((root / f"evaluate_{model}" / "results.json").read_text())
        m = results["metrics"]   # <suite>.<metric>
        scores[model] = {"beyond": beyond(m), "within": m["perplexity.pos_0_64"],
                         "pos_64_128": m["perplexity.pos_64_128"], "pos_128_256": m["perplexity.pos_128_256"],
                         "tokens_beyond": m["perplexity.pos_64_128_tokens"] + m["perplexity.pos_128_256_tokens"],
                         "passkey": m["passkey.accuracy"], "niah": niah_rows(results)}
    return {"seed": seed, "scores": scores, "seconds": timings}


def report(result: dict) -> None:
    s, t = result["scores"], result["seconds"]
    print(f"\nseed {result['seed']}: perplexity by prediction position on held-out text, windows of {EXTENDED} "
          f"({s['extension']['tokens_beyond']:.0f} predictions beyond {ORIGINAL})")
    print(f"  {'model':<10} {'0-64':>9} {'64-128':>9} {'128-256':>9} {'64-256':>9} {'64-256/0-64':>12}  passkey")
    for model in MODELS:
        x = s[model]
        print(f"  {model:<10} {x['within']:>9.1f} {x['pos_64_128']:>9.1f} {x['pos_128_256']:>9.1f} "
              f"{x['beyond']:>9.1f} {x['beyond'] / x['within']:>12.3f}  {x['passkey']:.2f}")
    ext = s["extension"]["beyond"]
    print(f"  extension vs parent:   {ext:.1f} vs {s['parent']['beyond']:.1f} "
          f"({100 * (ext / s['parent']['beyond'] - 1):+.2f}%)")
    print(f"  extension vs ablation: {ext:.1f} vs {s['ablation']['beyond']:.1f} "
          f"({100 * (ext / s['ablation']['beyond'] - 1):+.2f}%)")
    for model in MODELS:
        print(f"  NIAH accuracy, {model}:")
        print("\n".join(f"    {row}" for row in s[model]["niah"]))
    print(f"  wall time: pretrain {t['pretrain']:.0f} s, long_context {t['long_context']:.0f} s, "
          f"ablation {t['ablation']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-long-context")
    parser.add_argument("--report", action="store_true", help="print the results.json of an earlier run; run nothing")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.report:
        results = json.loads((out / "results.json").read_text())
        for result in results:
            report(result)
        return verdict(results)
    if not (out / "corpus" / "curate" / "manifest.json").is_file():
        stage("curate", out / "corpus")
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, out, out / "corpus" / "curate"))
        report(results[-1])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}")
    return verdict(results)


def verdict(results: list[dict]) -> int:
    for other in ("parent", "ablation"):
        below = [r["seed"] for r in results if r["scores"]["extension"]["beyond"] < r["scores"][other]["beyond"]]
        print(f"extension's 64-256 perplexity below the {other}'s: seeds {below or 'none'} of "
              f"{[r['seed'] for r in results]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
