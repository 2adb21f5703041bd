"""K-B span detection on the hand-labelled set (issue 20, "Span detection"): precision and recall per token of the
rules alone, the model's signal alone and both (training/data/salient_spans.py), with a real model's per-token losses.

The documents are `tests/training/data/kb_labelled.txt` ([[ ]] marks K-B spans), tokenised with the model's
vocabulary; a token is gold K-B when a marked span covers one of its non-space characters. The model signal marks the
`fraction` of word tokens with the highest loss under the model (the first token, which nothing predicts, never).

    .venv/bin/python benchmarks/span_detection.py RELEASE [--fractions 0.1 0.2 0.3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LABELLED = REPO / "tests" / "training" / "data" / "kb_labelled.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = parser.parse_args()

    import torch

    from training.config import ParallelConfig
    from training.data.salient_spans import (covered, model_salient, precision_recall, read_marked,
                                             salient_token_mask, token_offsets)
    from training.eval.generate import Generator
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    gpt, model = load_release(args.release)
    generator = Generator(gpt, model.max_position_embeddings, vocab_merges=model.vocab_merges)
    documents = read_marked(LABELLED.read_text())
    gold, rules, losses, texts = [], [], [], []
    for text, spans in documents:
        ids = generator.encode(text)
        pieces = [generator.decode([i]) for i in ids]
        if "".join(pieces) != text:
            raise SystemExit(f"the tokens do not spell {text!r}")
        gold += covered(token_offsets(pieces), spans)
        rules += salient_token_mask(text, pieces)
        nll = generator.token_nll(torch.tensor([ids]))[0].tolist()
        losses.append([0.0] + nll)
        texts.append(pieces)
    print(f"{len(documents)} documents, {len(gold)} tokens, {sum(gold)} K-B; model {args.release}", flush=True)
    precision, recall = precision_recall(rules, gold)
    print(f"rules:                  precision {precision:.3f} recall {recall:.3f}", flush=True)
    for fraction in args.fractions:
        signal = [m for doc_losses, pieces in zip(losses, texts) for m in model_salient(doc_losses, pieces, fraction)]
        p_model, r_model = precision_recall(signal, gold)
        p_both, r_both = precision_recall([a or b for a, b in zip(rules, signal)], gold)
        print(f"model top {fraction:.0%}:  precision {p_model:.3f} recall {r_model:.3f};  rules + model: precision "
              f"{p_both:.3f} recall {r_both:.3f}", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
