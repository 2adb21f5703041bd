"""Does code_cpt teach the tiny model to fill in the middle? Middle-token loss on held-out FIM samples, before and after.

For each seed: pretrain the tiny profile (the parent, which never sees a FIM document), then run its code_cpt stage as
the tiny preset configures it (the curate_code mixture: package code with FIM at rate 0.5, PSM, and the parent's
prose). The ablation runs the same code_cpt on the same mixture curated with FIM off (fim.rate 0), so that what FIM
adds is told apart from what more training on code adds. Every model is scored on the same held-out FIM samples:
snippets of Python standard-library files (never curated: curate reads site-packages), cut at two character
positions drawn uniformly (training.data.fim.plan at rate 1, PSM) and encoded as in training; each whole sample fits
the parent's 64-token training sequence. The score is the mean NLL of the middle tokens (EOD excluded), pooled over
samples: `training.train.losses.middle_token_nll`.

    python benchmarks/fim_learning.py [--seeds 1 2 3] [--samples 300] [--work DIR] [--no-ablation]
Prints, per seed, the parent's, code_cpt's and the ablation's middle-token loss and code_cpt's relative drop against
the parent; the claim is a drop of at least 20%. Results also go to DIR/results.json. ~5 minutes per seed on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLAIM = 0.20   # the bar: code_cpt's middle-token loss at least 20% below the parent's


def run_stage(kind: str, *args: str, config: Path | None = None) -> None:
    """`python -m training KIND ...` in a fresh process; its output goes to the log beside the run."""
    cmd = [sys.executable, "-W", "ignore", "-m", "training", kind, *(["--config", str(config)] if config else []),
           *args]
    started = time.time()
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"  {kind} {' '.join(a for a in args if a.startswith(('seed', 'name')))} {time.time() - started:.0f} s",
          flush=True)


def curate(data: Path) -> None:
    """The parent's corpus (tiny `curate`), the code_cpt mixture (tiny `curate_code`) and the same without FIM."""
    from training.config import load_preset, resolve_stage_config, to_yaml
    from training.config.curate import CurateConfig
    from training.config.loader import validate

    shared = [f"run_root={data}", f"tracking.uri=sqlite:///{data}/mlflow.db"]
    run_stage("curate", "--preset", "tiny", *(f for s in shared for f in ("--set", s)))
    code = resolve_stage_config("curate_code", "tiny", overrides=shared)
    doc = code.model_dump(mode="json")
    for source in doc["sources"]:
        source["fim"]["rate"] = 0.0
    no_fim = validate(CurateConfig, {**doc, "name": "curate_nofim"})
    assert load_preset("tiny")["code_cpt"]["fim_rate"] == 0.5
    for cfg in (code, no_fim):
        path = data / f"{cfg.stage_name}.yaml"
        path.write_text(to_yaml(cfg))
        run_stage("curate", config=path)


def train(root: Path, data: Path, seed: int, ablation: bool) -> dict[str, Path]:
    """Parent, code_cpt (and the ablation) for one seed; returns their release directories."""
    common = [f"run_root={root}", f"seed={seed}", f"tracking.uri=sqlite:///{root}/mlflow.db"]
    sets = lambda *extra: [f for s in (*common, *extra) for f in ("--set", s)]   # noqa: E731
    run_stage("pretrain", "--preset", "tiny", *sets(f"data_manifest={data}/curate"))
    run_stage("code_cpt", "--preset", "tiny", *sets(f"data_manifest={data}/curate_code"))
    releases = {"parent": root / "pretrain" / "release", "code_cpt": root / "code_cpt" / "release"}
    if ablation:
        run_stage("code_cpt", "--preset", "tiny", *sets(f"data_manifest={data}/curate_nofim", "name=code_cpt_nofim",
                                                         "fim_rate=0"))
        releases["code_cpt_no_fim"] = root / "code_cpt_nofim" / "release"
    return releases


def heldout_samples(count: int, max_tokens: int, merges: int | None,
                    seed: int = 0) -> list[tuple[list[int], tuple[int, int]]]:
    """(token ids, middle span) of `count` PSM samples from standard-library snippets, each at most `max_tokens`,
    in the vocabulary of the models compared (`merges`: their model.vocab_merges)."""
    from training import tokenizer as T
    from training.data import fim
    from training.eval.heldout import code_files
    from training.train.losses import fim_middle_span

    rng, samples = random.Random(seed), []
    for doc_id, source in code_files(seed, max_documents=count * 4):
        lines = source.splitlines(keepends=True)
        start = rng.randrange(len(lines))
        snippet, ids, middle = "", [], []
        for line in lines[start:]:   # whole lines while the snippet and its 4 FIM tokens stay within max_tokens
            if len(fim.encode_pieces([snippet + line], merges)[0]) > max_tokens - 6:
                break
            snippet += line
        while snippet.strip():
            decision = fim.plan(snippet, f"{doc_id}:{start}", seed=seed, rate=1.0)
            prefix, middle, suffix = fim.encode_pieces(list(decision.split(snippet)), merges)
            ids = T.fim_document_ids(prefix, middle, suffix, decision.mode)
            if len(ids) <= max_tokens:
                break
            snippet = "".join(snippet.splitlines(keepends=True)[:-1])   # split pieces encode a token or two longer
        if snippet.strip() and middle and len(ids) >= 16:
            samples.append((ids, fim_middle_span(len(prefix), len(middle), len(suffix))))
        if len(samples) == count:
            return samples
    raise SystemExit(f"only {len(samples)} held-out samples of {count}")


def middle_loss(release: Path, samples, batch_size: int = 8) -> tuple[float, int]:
    """Mean NLL of the middle tokens of `samples` under the release's model, and how many tokens that is."""
    import torch

    from training import tokenizer as T
    from training.eval.generate import Generator
    from training.model.release import load_release
    from training.train.losses import middle_token_nll

    gpt, model_cfg = load_release(release)
    gen = Generator(gpt, model_cfg.max_position_embeddings, vocab_merges=model_cfg.vocab_merges)
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        tokens = torch.full((len(batch), max(len(ids) for ids, _ in batch)), T.token_id(T.PAD), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):   # right-padded: causal attention never sees the padding
            tokens[row, :len(ids)] = torch.tensor(ids)
        part, n = middle_token_nll(gen.token_nll(tokens, chunk=16), [span for _, span in batch])
        total, count = total + part, count + n
    return total / count, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=300, help="held-out FIM samples (the same for every model)")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest sample: the parent's training sequence")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--no-ablation", action="store_true", help="skip code_cpt on the mixture without FIM")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="seekflow-fim-"))
    print(f"work directory: {work}", flush=True)
    curate(work / "data")
    releases = {}
    for seed in args.seeds:
        print(f"seed {seed}:", flush=True)
        releases[seed] = train(work / f"seed{seed}", work / "data", seed, not args.no_ablation)

    from training.config import ParallelConfig, load_preset
    from training.parallel.setup import init_distributed

    init_distributed(ParallelConfig(), seed=0)
    merges = load_preset("tiny")["pretrain"]["model"].get("vocab_merges")
    samples = heldout_samples(args.samples, args.max_tokens, merges)
    results = {}
    for seed, models in releases.items():
        losses = {name: middle_loss(path, samples) for name, path in models.items()}
        drop = 1 - losses["code_cpt"][0] / losses["parent"][0]
        results[seed] = {**{name: loss for name, (loss, _) in losses.items()}, "relative_drop": drop,
                         "middle_tokens": losses["parent"][1]}
        others = "".join(f", {name} {loss:.4f}" for name, (loss, _) in losses.items()
                         if name not in ("parent", "code_cpt"))
        print(f"seed {seed}: middle-token loss parent {losses['parent'][0]:.4f}, code_cpt {losses['code_cpt'][0]:.4f}"
              f"{others}; drop {drop:.1%} ({losses['parent'][1]} middle tokens in {len(samples)} samples)", flush=True)
    drops = [r["relative_drop"] for r in results.values()]
    holds = "holds on every seed" if min(drops) >= CLAIM else "does NOT hold on every seed"
    print(f"relative drop per seed: {', '.join(f'{d:.1%}' for d in drops)}; the >= {CLAIM:.0%} claim {holds}",
          flush=True)
    (work / "results.json").write_text(json.dumps({"samples": len(samples), "max_tokens": args.max_tokens,
                                                    "seeds": results}, indent=2))


if __name__ == "__main__":   # megatron's dist_checkpointing may spawn processes
    main()
