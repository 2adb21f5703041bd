"""The factual-recall probe (issue 20): held-out cloze questions about the generated knowledge corpus's fictional
people (training/knowledge.py), asked of a loaded model. Two scores:
  - **exact match**: the greedy continuation's first word is the gold attribute;
  - **gold rank**: the rank of the gold answer's first token among the model's next-token logits after the prompt
    (1 is best): it moves before exact match does, so small models show what they stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training import knowledge


@dataclass(frozen=True)
class RecallScores:
    exact_match: float
    mean_gold_rank: float
    median_gold_rank: float
    probes: int


def score_recall(generator, probes: list[knowledge.Probe], max_new_tokens: int = 8) -> RecallScores:
    """`generator`: a training.eval.generate.Generator over the model to probe."""
    from training.eval.kv_cache import hidden_states

    prompts = [generator.encode(p.prompt) for p in probes]
    outputs = generator.generate(prompts, max_new_tokens)
    matches = [knowledge.exact_match(out.text, probe) for out, probe in zip(outputs, probes)]
    ranks = []
    with torch.no_grad():
        for prompt, probe in zip(prompts, probes):
            gold = generator.encode(" " + probe.answer)[0]
            tokens = generator._to_rows(torch.tensor([prompt], device=generator.device))
            logits = generator._logits(hidden_states(generator.gpt, tokens)[-1:])[0, 0]
            gold_row = int(generator._to_rows(torch.tensor([gold], device=generator.device))[0])
            ranks.append(int((logits > logits[gold_row]).sum()) + 1)
    ordered = sorted(ranks)
    return RecallScores(sum(matches) / len(probes), sum(ranks) / len(ranks), float(ordered[len(ordered) // 2]),
                        len(probes))


def main(argv: list[str] | None = None) -> int:
    """`python -m training.eval.recall RELEASE PROBES.jsonl [--limit N]`: one process, prints the scores as JSON."""
    import argparse
    import json
    from dataclasses import asdict

    from training.config import ParallelConfig
    from training.data.knowledge_data import read_probes
    from training.eval.generate import Generator
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release")
    parser.add_argument("probes", help="a knowledge corpus's curate/knowledge_probes.jsonl")
    parser.add_argument("--limit", type=int, help="the first N probes only")
    args = parser.parse_args(argv)
    init_distributed(ParallelConfig(), seed=0)
    try:
        gpt, model = load_release(args.release)
        probes = read_probes(args.probes)[:args.limit]
        scores = score_recall(Generator(gpt, model.max_position_embeddings, vocab_merges=model.vocab_merges), probes)
        print(json.dumps(asdict(scores)), flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
