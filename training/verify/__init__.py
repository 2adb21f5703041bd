"""Checking what a model produced: running its code in the sandbox (`sandbox`, `isolation`, `service`).

Shared by evaluation (HumanEval) and reinforcement learning (code rewards); imports neither `eval` nor `data`."""
