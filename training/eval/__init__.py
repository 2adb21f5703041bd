"""Evaluation suites (HumanEval, FIM, passkey, arithmetic, perplexity) and the decoding they share.

Scoring modules are pure Python (+ numpy/torch tensors for perplexity) and testable without a model; `generate`
holds the only model code; `training.stages.evaluate` runs the suites on a checkpoint and records the results.
"""
