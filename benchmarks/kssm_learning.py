"""Does KSSM help the tiny profile store facts? (issue 20, "KSSM helps") Factual recall on held-out probes after
knowledge CPT with KSSM, against the same steps of plain CPT, per seed.

Per seed, through the real stages (`python -m training ... --preset tiny`):
  base       the tiny pretrain (or an earlier run's release per seed: --bases DIR, DIR/seed{N}/pretrain/release)
  corpus     the generated knowledge corpus (training/knowledge.py): --people fictional people, 4 biographies each;
             half of them also have their questions answered (the question format), the probes ask about the rest
  plain      code_cpt from the base on the corpus, next-token loss (`fim_rate=null`, no mixture)
  kssm       the same run with `kssm` (training/train/kssm.py: its defaults, or --set kssm.<field>=...)
Both releases answer the same held-out probes (`python -m training.eval.recall`): exact match of the first generated
word, and the mean rank of the gold answer's first token. Every number is printed; nothing is tuned here.

    .venv/bin/python benchmarks/kssm_learning.py [--seeds 1 2 3] [--people 100] [--steps 150] [--out DIR]
                                                 [--bases DIR] [--set kssm.span_weight=2 ...] [--variant NAME]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from sft_learning import tracking  # noqa: E402
from stage_runs import stage  # noqa: E402


def recall(release: Path, probes: Path) -> dict:
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "training.eval.recall", str(release), str(probes)],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"recall of {release} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_seed(seed: int, out: Path, bases: Path | None, people: int, steps: int, kssm_sets: list[str],
             variant: str = "kssm") -> dict:
    from training.config import resolve_stage_config
    from training.data.knowledge_data import write_knowledge_curate

    root = out / f"seed{seed}"
    base = (bases / f"seed{seed}" / "pretrain" / "release") if bases else root / "pretrain" / "release"
    if not bases and not (base / "complete.json").exists():
        if not (out / "corpus" / "curate" / "manifest.json").is_file():
            stage("curate", out / "corpus", tracking(out / "corpus"))
        stage("pretrain", root, tracking(root), f"seed={seed}", f"data_manifest={out / 'corpus' / 'curate'}")
    knowledge = root / "knowledge"
    if not (knowledge / "curate" / "manifest.json").is_file():
        merges = resolve_stage_config("code_cpt", "tiny").model.vocab_merges
        write_knowledge_curate(knowledge, seed=seed, people=people, vocab_merges=merges)
    result = {"seed": seed}
    for name, extra in (("plain", []), ("kssm", ["kssm.span_weight=1.0", *kssm_sets])):
        run_root = root / (variant if name == "kssm" else name)   # a finished run is skipped (its manifest)
        seconds = stage("code_cpt", run_root, tracking(run_root), f"seed={seed}", f"init_checkpoint={base}",
                        f"data_manifest={knowledge / 'curate'}", "mixture=null", "fim_rate=null",
                        f"train.steps={steps}", f"train.save_interval={steps}", *extra)
        result[name] = {**recall(run_root / "code_cpt" / "release", knowledge / "curate" / "knowledge_probes.jsonl"),
                        "seconds": seconds}
    result["base"] = recall(base, knowledge / "curate" / "knowledge_probes.jsonl")
    return result


def report(r: dict) -> None:
    plain, kssm, base = r["plain"], r["kssm"], r["base"]
    print(f"seed {r['seed']}: exact match base {base['exact_match']:.3f}, plain {plain['exact_match']:.3f}, kssm "
          f"{kssm['exact_match']:.3f} ({100 * (kssm['exact_match'] - plain['exact_match']):+.1f} points); mean gold "
          f"rank base {base['mean_gold_rank']:.1f}, plain {plain['mean_gold_rank']:.1f}, kssm "
          f"{kssm['mean_gold_rank']:.1f}; {plain['probes']} probes; {plain['seconds']:.0f} s / {kssm['seconds']:.0f} s",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--people", type=int, default=100)
    parser.add_argument("--steps", type=int, default=150, help="code_cpt steps of both runs (the tiny preset's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-kssm")
    parser.add_argument("--bases", type=Path, help="reuse the pretrained bases of an earlier run (its --out)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="kssm.<field>=<value> for the kssm run")
    parser.add_argument("--variant", default="kssm", help="the kssm run's directory: an ablation (with --set) beside "
                                                          "the same plain runs, which a rerun into --out reuses")
    args = parser.parse_args()
    out = args.out.resolve()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, out, args.bases, args.people, args.steps, args.sets, args.variant))
        report(results[-1])
        (out / f"results-{args.variant}.json").write_text(json.dumps(results, indent=2))
    gaps = [r["kssm"]["exact_match"] - r["plain"]["exact_match"] for r in results]
    ranks = [r["plain"]["mean_gold_rank"] - r["kssm"]["mean_gold_rank"] for r in results]
    print(f"{args.variant} - plain exact match per seed: {', '.join(f'{100 * g:+.1f} points' for g in gaps)}; gold "
          f"rank improvement per seed: {', '.join(f'{g:+.1f}' for g in ranks)}; results: "
          f"{out / f'results-{args.variant}.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
