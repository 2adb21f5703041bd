"""Fill-in-the-middle exact match on held-out code (single-line infilling).

Prompt format, PSM (prefix-suffix-middle) with DeepSeek's FIM tokens (`training.tokenizer.fim_psm_ids`, shared with
code training), as in DeepSeek-Coder (Guo et al. 2024, arXiv:2401.14196) §3.1 (training with the FIM objective)
and §4.3 (evaluation):
    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜>   → the model writes the middle
The task is §4.3's single-line infilling: one source line is masked out and the prediction (cut at its first
newline) must equal it, ignoring surrounding whitespace. Spans are drawn with a seed from the standard library's own
sources (see `training.eval.heldout` for why those are held out); prefix and suffix are the lines around the hole,
trimmed to a token budget so that the prompt fits any small model's context.
"""
from __future__ import annotations

import io
import random
import tokenize
from dataclasses import dataclass
from typing import Sequence

from training import tokenizer as T
from training.eval import heldout

MIN_LINE_CHARS, MAX_LINE_CHARS = 8, 100


@dataclass(frozen=True)
class FimItem:
    id: str            # "<stdlib relative path>:<1-based line>"
    prefix: str
    middle: str        # the masked line, without its newline
    suffix: str


def _eligible(line: str) -> bool:
    """A line worth predicting: code of moderate length (not blank, a comment, or a string on its own)."""
    text = line.strip()
    return (MIN_LINE_CHARS <= len(text) <= MAX_LINE_CHARS and not text.startswith(("#", '"', "'"))
            and text not in ("else:", "try:", "finally:", "pass", "return"))


def _string_lines(source: str) -> set[int] | None:
    """0-based indices of lines inside or ending a multi-line string (docstring prose is not code to infill);
    None when the file does not tokenize."""
    inside: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                inside.update(range(tok.start[0], tok.end[0]))   # rows are 1-based: start+1 .. end, as 0-based
    except (tokenize.TokenError, SyntaxError):
        return None
    return inside


def draw_items(count: int, seed: int, context_lines: int = 12) -> list[FimItem]:
    """`count` single-line holes, one per file, in a seeded order over the eligible stdlib files."""
    rng = random.Random(f"fim-{seed}")
    items: list[FimItem] = []
    for path in heldout.shuffled_files(seed, "fim"):
        source = heldout.read_source(path)
        if source is None:
            continue
        strings = _string_lines(source)
        if strings is None:
            continue
        lines = source.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if i not in strings and _eligible(line)]
        if not candidates:
            continue
        i = rng.choice(candidates)
        items.append(FimItem(
            id=f"{heldout.relative_name(path)}:{i + 1}",
            prefix="".join(lines[max(0, i - context_lines):i]),
            middle=lines[i].rstrip("\r\n"),
            suffix="\n" + "".join(lines[i + 1:i + 1 + context_lines]),   # the hole is one line: its newline stays
        ))
        if len(items) == count:
            break
    return items


def prompt_ids(item: FimItem, encode, max_prefix_tokens: int, max_suffix_tokens: int) -> list[int]:
    """PSM prompt token ids: the prefix keeps its *last* tokens, the suffix its *first* (those nearest the hole)."""
    prefix = encode(item.prefix)[-max_prefix_tokens:] if max_prefix_tokens else []
    suffix = encode(item.suffix)[:max_suffix_tokens]
    return T.fim_psm_ids(prefix, suffix)


def prediction(generated: str) -> str:
    """The infilled line: the generation up to its first newline (single-line infilling)."""
    return generated.split("\n", 1)[0]


def exact_match(predicted: str, target: str) -> bool:
    return prediction(predicted).strip() == target.strip()


def score(predictions: Sequence[str], items: Sequence[FimItem]) -> dict[str, float]:
    hits = [exact_match(p, item.middle) for p, item in zip(predictions, items, strict=True)]
    return {"exact_match": sum(hits) / len(hits) if hits else 0.0, "problems": float(len(hits))}
