"""The curation funnel: documents and tokens kept after each step, per source, summed over shards; and its plot.

A funnel is a list of steps `{"step", "documents", "tokens", "dropped": {reason: count}}` in pipeline order. Tokens
are counted with DeepSeek's tokenizer on each document as read (so a filter's line says how many input tokens it
kept); the last lines, after packing, count the packed tokens (EOD included).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path


def sum_shards(per_shard: list[list[dict]]) -> list[dict]:
    """One funnel from the shards' funnels (every shard runs the same steps in the same order)."""
    total = []
    for steps in zip(*per_shard):
        names = {s["step"] for s in steps}
        if len(names) != 1:
            raise ValueError(f"shards ran different steps: {sorted(names)}")
        dropped: Counter[str] = Counter()
        for s in steps:
            dropped.update(s["dropped"])
        skipped: Counter[str] = Counter()
        for s in steps:
            skipped.update(s.get("skipped_files", {}))
        total.append({"step": steps[0]["step"],
                      "documents": sum(s["documents"] or 0 for s in steps),
                      "tokens": None if steps[0]["tokens"] is None else sum(s["tokens"] or 0 for s in steps),
                      "dropped": dict(sorted(dropped.items())),
                      **({"skipped_files": dict(sorted(skipped.items()))} if skipped else {})})
    return total


def add_merge_steps(funnel: list[dict], counts: dict) -> list[dict]:
    """Append the merge's cross-shard steps: exact dedup across shards and sources, then MinHash near-dedup."""
    documents = counts["candidates"] - counts["exact_duplicates"]
    tokens = counts["candidate_tokens"] - counts["exact_duplicate_tokens"]
    return funnel + [
        {"step": "exact dedup (all shards)", "documents": documents, "tokens": tokens,
         "dropped": {"duplicate": counts["exact_duplicates"]}},
        {"step": "near dedup (all shards)", "documents": counts["documents"], "tokens": counts["tokens"],
         "dropped": {"near_duplicate": counts["near_duplicates"]}},
    ]


def describe(funnel: list[dict]) -> str:
    return " → ".join(f"{s['step']} {s['documents']}" for s in funnel)


def plot(funnels: dict[str, list[dict]], target: Path) -> Path:
    """A PNG: per source, documents (left) and tokens (right) after each step."""
    import matplotlib

    matplotlib.use("Agg")   # no display in jobs
    import matplotlib.pyplot as plt

    rows = max(len(funnels), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.2 * rows), squeeze=False)
    for row, (label, funnel) in enumerate(funnels.items()):
        names = [s["step"] for s in funnel]
        for col, (key, color) in enumerate((("documents", "tab:blue"), ("tokens", "tab:orange"))):
            ax = axes[row][col]
            values = [s[key] or 0 for s in funnel]
            ax.bar(range(len(names)), values, color=color)
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{label}: {key} kept after each step", fontsize=9)
            for x, value in enumerate(values):
                ax.text(x, value, f"{value:,}", ha="center", va="bottom", fontsize=6)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
