"""Needle in a haystack as DeepSeek-V2 (§3.1.4, Figure 4) and DeepSeek-V3 (§4.3, Figure 8) report it after a context
extension: retrieval accuracy per (context length × needle depth) cell, drawn as a heatmap with the context length
on x, the needle's depth in the document on y (0% at the top) and the accuracy as colour.

The needle is the passkey suite's (training.benchmarks_data): the papers do not publish their haystack, and a
passkey has an exact answer, so a cell's score is a plain hit rate rather than a judge's 1-10 grade.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Sequence

from training.benchmarks_data import PasskeyItem


@dataclass(frozen=True)
class Cell:
    context_length: int
    depth: float
    trials: int
    hits: int

    @property
    def accuracy(self) -> float:
        return self.hits / self.trials if self.trials else math.nan


def grid(hits: Sequence[bool], items: Sequence[PasskeyItem]) -> list[Cell]:
    """One cell per (context length, depth) present in `items`, ordered by length then depth."""
    counts: dict[tuple[int, float], list[int]] = {}
    for hit, item in zip(hits, items, strict=True):
        cell = counts.setdefault((item.context_length, item.depth), [0, 0])
        cell[0] += 1
        cell[1] += bool(hit)
    return [Cell(length, depth, n, k) for (length, depth), (n, k) in sorted(counts.items())]


def depth_metrics(cells: Sequence[Cell]) -> dict[str, float]:
    """`accuracy_depth<d>`: accuracy at each depth over every length, weighted by trials (the grid's rows)."""
    rows: dict[float, list[int]] = {}
    for c in cells:
        row = rows.setdefault(c.depth, [0, 0])
        row[0] += c.trials
        row[1] += c.hits
    return {f"accuracy_depth{depth:g}": k / n for depth, (n, k) in sorted(rows.items()) if n}


def table(cells: Sequence[Cell]) -> dict[str, list]:
    """Column -> values, one row per cell: what `mlflow.log_table` stores (the UI's table view)."""
    return {"context_length": [c.context_length for c in cells], "depth": [c.depth for c in cells],
            "trials": [c.trials for c in cells], "hits": [c.hits for c in cells],
            "accuracy": [c.accuracy for c in cells]}


def matrix(cells: Sequence[Cell]) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, accuracy[depth][length]); a cell that was not run is NaN (drawn blank)."""
    lengths = sorted({c.context_length for c in cells})
    depths = sorted({c.depth for c in cells})
    values = [[math.nan] * len(lengths) for _ in depths]
    for c in cells:
        values[depths.index(c.depth)][lengths.index(c.context_length)] = c.accuracy
    return lengths, depths, values


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def heatmap_png(cells: Sequence[Cell], title: str = "Needle in a haystack (passkey retrieval)") -> bytes:
    """The grid as a PNG, laid out like the papers' figures; each cell also printed as a number."""
    import matplotlib

    matplotlib.use("Agg")   # no display in jobs
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths, values = matrix(cells)
    data = np.ma.masked_invalid(np.array(values, dtype=float))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(lengths) + 2.5), max(3.0, 0.4 * len(depths) + 1.8)))
    image = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (document depth %)")
    trials = sorted({c.trials for c in cells})
    ax.set_title(f"{title}\n{'/'.join(map(str, trials))} trial(s) per cell", fontsize=9)
    for y, row in enumerate(values):
        for x, value in enumerate(row):
            if not math.isnan(value):
                ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
