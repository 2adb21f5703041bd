"""Knowledge-bearing (K-B) span detection without human labels (issue 20; KSSM, Wang et al.): the tokens that carry
a fact (who, where, when, how many) as opposed to the ones any fluent text has (knowledge-free, K-F).

Two signals, both offline:
  - **rules** (`rule_spans`): numbers and dates, and proper nouns: runs of capitalised words, without the word that
    opens a sentence when it is a common opener ("The", "In", "Born"); a single capitalised word opening a sentence
    counts only when it is written like a name (NumPy) or capitalised elsewhere mid-sentence;
  - **the model itself** (`model_salient`): the paper's observation is that a language model mispredicts K-B tokens
    most often, so the tokens with the highest loss under the current model are candidates. Only word tokens count
    (punctuation and function words mispredicted after a rare name are not facts).
`salient_token_mask` combines them per token: a token is K-B when a rule span covers it, or when the model signal
marks it (the union: rules find the entities and numbers, the model finds the salient common nouns rules cannot,
"glassblower" in "worked as a glassblower").
"""
from __future__ import annotations

import re

# Sentence-initial words that are capitalised only because they open the sentence.
_COMMON_OPENERS = frozenset("""a an the this that these those it its he she they we you i in on at by for from of to
with as after before during when while where if but and or so then there here by born his her their our my some many
most all each every no not one two three question answer""".split())
_FUNCTION_WORDS = _COMMON_OPENERS | frozenset("""is are was were be been being has have had do does did will would
can could should may might must shall into onto over under about above below up down out off than too very just
also only own same such both either neither nor yet lived worked grew ran""".split())
_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
           "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
_DATE = re.compile(rf"\b(?:\d{{1,2}} (?:{_MONTHS})\.? \d{{3,4}}|(?:{_MONTHS})\.? \d{{1,2}},? \d{{3,4}}|"
                   rf"\d{{4}}-\d{{2}}-\d{{2}})\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
# a run of capitalised words, through the lowercase particles of names (Guido van Rossum, Leonardo da Vinci)
_CAPITALISED_RUN = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:(?:van|von|de|da|del|der|den|di|du|la|le|bin|ibn)\s+)?"
                              r"[A-Z][\w'-]*)*")
_SENTENCE_END = re.compile(r"(?:^|[.!?:]\s+|\n\s*)$")


def rule_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) character spans the rules find, kind "date", "number" or "proper_noun"; sorted, and a
    number inside a date is not repeated."""
    spans = [(m.start(), m.end(), "date") for m in _DATE.finditer(text)]
    inside = lambda s, e: any(a <= s and e <= b for a, b, _ in spans)   # noqa: E731
    spans += [(m.start(), m.end(), "number") for m in _NUMBER.finditer(text) if not inside(m.start(), m.end())]
    for m in _CAPITALISED_RUN.finditer(text):
        start, words = m.start(), m.group().split()
        opens_sentence = bool(_SENTENCE_END.search(text[:start]))
        if opens_sentence and words[0].lower() in _COMMON_OPENERS:   # drop the sentence's capitalised opener
            if len(words) == 1:
                continue
            start, words = text.index(words[1], start + len(words[0])), words[1:]
        elif opens_sentence and len(words) == 1 and not _looks_like_a_name(words[0], text):
            continue
        if not inside(start, m.end()):
            spans.append((start, m.end(), "proper_noun"))
    return sorted(spans)


def _looks_like_a_name(word: str, text: str) -> bool:
    """A single capitalised word opening a sentence is a name when it is written like one (an inner capital:
    NumPy, HTTP) or appears capitalised inside a sentence elsewhere in the document."""
    if any(c.isupper() for c in word[1:]):
        return True
    return any(not _SENTENCE_END.search(text[:m.start()]) for m in re.finditer(rf"\b{re.escape(word)}\b", text))


def model_salient(token_losses: list[float], token_texts: list[str], fraction: float) -> list[bool]:
    """The `fraction` of word tokens (letters or digits, not function words) with the highest loss under the
    model; other tokens are never marked."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    words = [i for i, t in enumerate(token_texts)
             if re.search(r"\w", t) and t.strip().lower() not in _FUNCTION_WORDS]
    chosen = set(sorted(words, key=lambda i: -token_losses[i])[:round(fraction * len(words))])
    return [i in chosen for i in range(len(token_texts))]


def token_offsets(token_texts: list[str]) -> list[tuple[int, int]]:
    """Character (start, end) of each token's text without its leading spaces (a BPE token " Kesmora" starts at its
    letter), for tokens whose texts concatenate to the document."""
    offsets, position = [], 0
    for piece in token_texts:
        offsets.append((position + len(piece) - len(piece.lstrip()), position + len(piece)))
        position += len(piece)
    return offsets


def covered(offsets: list[tuple[int, int]], spans) -> list[bool]:
    """Per token (`token_offsets`): does any span cover a character of it?"""
    return [start < end and any(s < end and start < e for s, e, *_ in spans) for start, end in offsets]


def salient_token_mask(text: str, token_texts: list[str], token_losses: list[float] | None = None,
                       model_fraction: float = 0.0) -> list[bool]:
    """Per token: K-B (rules, or the model signal when losses are given), see the module docstring."""
    if "".join(token_texts) != text:
        raise ValueError("the token texts do not spell the document")
    marks = covered(token_offsets(token_texts), rule_spans(text))
    if token_losses is not None and model_fraction > 0:
        marks = [r or m for r, m in zip(marks, model_salient(token_losses, token_texts, model_fraction))]
    return marks


def read_marked(text: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """Hand-labelled documents, one a line, K-B spans marked `[[like this]]` (lines starting with # are comments):
    (the text without the marks, the marked character spans) per document."""
    documents = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        plain, spans = "", []
        for piece in re.split(r"(\[\[.*?\]\])", line):
            if piece.startswith("[["):
                spans.append((len(plain), len(plain) + len(piece) - 4))
                piece = piece[2:-2]
            plain += piece
        documents.append((plain, spans))
    return documents


def precision_recall(predicted: list[bool], gold: list[bool]) -> tuple[float, float]:
    true_positive = sum(p and g for p, g in zip(predicted, gold))
    return (true_positive / max(1, sum(predicted)), true_positive / max(1, sum(gold)))
