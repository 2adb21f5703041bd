"""Text steps of the curate stage: normalisation, stock Gopher/C4 quality blocks, offline language ID, and the whole
chain once through datatrove's LocalPipelineExecutor (pickling, stats per drop reason)."""
import json
import pickle

import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor

from training.benchmarks_data import PASSKEY_TASK
from training.data.curate.decontam import DecontaminationFilter, default_index
from training.data.curate.pii import RedactPII
from training.data.curate.text import (MARKDOWN_PROSE, GopherPrecheck, LanguageID, NormalizeUnicode, QualityParams,
                                       quality_filters)

PROSE = "\n".join([
    "The river runs through the old town and past the mill that has stood there for two hundred years.",
    "Every spring the water rises with the snow from the mountains and the people of the town watch it closely.",
    "The miller keeps a record of the height of the water on a wooden post beside the door of the house.",
    "Some years the water has reached the steps of the church, and the children have sailed small boats in the square.",
    "Most years it falls back quietly, and the fields along the banks turn green with the new grass of the season.",
    "Visitors come to see the mill wheel turn, and they often stay to eat bread baked with the flour it grinds.",
])
GERMAN = ("Der Fluss fließt durch die Altstadt und an der Mühle vorbei, die dort seit zweihundert Jahren steht. "
          "Jedes Frühjahr steigt das Wasser mit dem Schnee aus den Bergen.")
FRENCH = ("La rivière traverse la vieille ville et passe devant le moulin qui se dresse là depuis deux cents ans. "
          "Chaque printemps, l'eau monte avec la neige des montagnes.")


def run_filter(step, text):
    doc = Document(text=text, id="t")
    return step.filter(doc), doc


def chain_verdict(steps, text):
    doc = Document(text=text, id="t")
    for step in steps:
        result = step.filter(doc)
        if result is not True:
            return result
    return True


# ------------------------------------------------------------------------------------------------ normalisation --
@pytest.mark.parametrize("raw, expected", [
    ("cafe\u0301", "café"),                                         # NFD -> NFC
    ("a\r\nb\rc", "a\nb\nc"),                                       # line endings
    ("non\u00a0breaking\u2009thin\u3000wide", "non breaking thin wide"),
    ("zero\u200bwidth\ufeff", "zerowidth"),
    ("trailing   \nspaces\t\n", "trailing\nspaces"),
    ("a\n\n\n\n\n\n\nb", "a\n\n\nb"),                                # > 2 blank lines -> 2
    ("The Mona Lisa doesnâ€™t have eyebrows.", "The Mona Lisa doesn’t have eyebrows."),  # ftfy mojibake
])
def test_normalize_examples(raw, expected):
    assert NormalizeUnicode().format(raw) == expected


def test_normalize_keeps_code_indentation_and_alignment():
    code = "def f(x):\n    if x:\n\treturn {'a':   1,\n\t        'bb':  2}\n"
    assert NormalizeUnicode().format(code) == code.rstrip("\n")


def test_normalize_counts_changed_documents():
    step = NormalizeUnicode()
    docs = [Document(text="clean", id="a"), Document(text="dirty  \r\n", id="b")]
    out = list(step.run(iter(docs)))
    assert [d.text for d in out] == ["clean", "dirty"]
    assert step.stats["changed"].total == 1 and step.stats["total"].total == 2


# ----------------------------------------------------------------------------------------------- quality filters --
def test_good_prose_passes_every_quality_block():
    assert chain_verdict(quality_filters(), PROSE) is True


@pytest.mark.parametrize("text, reason", [
    ("\n\n".join(["Click here to subscribe to our newsletter today."] * 20), "dup_para_frac"),
    ("\n".join(["Click here to subscribe to our newsletter today."] * 20), "dup_line_frac"),
    ("Buy now. " * 200, "top_2_gram"),
    ("Home About Contact Login", "top_2_gram"),
    (PROSE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    (PROSE + "\nThe config reads {\"river\": true} in the file on the shelf.", "curly_bracket"),
    (":" * 5000, "long_chunk"),
    ("", "empty"),
])
def test_quality_blocks_drop_with_reason(text, reason):
    assert chain_verdict(quality_filters(), text) == (False, reason)


GOPHER_QUALITY_ONLY = QualityParams(gopher_repetition=False, c4=False)


@pytest.mark.parametrize("text, reason", [
    ("Home About Contact Login", "gopher_short_doc"),
    ("\n".join(f"- item {i} of the list is where the things are kept" for i in range(60)), "gopher_too_many_bullets"),
    (" ".join(f"{i}+{i}={2 * i};" for i in range(80)), "gopher_below_alpha_threshold"),
    (" ".join(["the", "cat", "and", "a", "dog"] * 20), "gopher_below_avg_threshold"),
])
def test_gopher_quality_reasons(text, reason):
    assert chain_verdict(quality_filters(GOPHER_QUALITY_ONLY), text) == (False, reason)


def test_precheck_long_doc_agrees_with_stock_rule():
    text = "word " * 60
    assert GopherPrecheck(max_doc_words=50, max_chunk_chars=None).filter(Document(text=text, id="t")) == \
        (False, "gopher_long_doc")
    stock = quality_filters(QualityParams(max_doc_words=50, gopher_repetition=False, c4=False))[1]
    assert stock.filter(Document(text=text, id="t")) == (False, "gopher_long_doc")


def test_markdown_override_keeps_a_readme_the_stock_rules_drop():
    readme = "\n".join(
        [f"## Usage `step_{i}()`\n\nCall `pkg.step_{i}(x=1)` (see [docs](https://example.org/{i})) to run the "
         f"stage and check that the output is what you expect from it." for i in range(12)])
    assert chain_verdict(quality_filters(GOPHER_QUALITY_ONLY), readme) == (False, "gopher_below_alpha_threshold")
    assert chain_verdict(quality_filters(MARKDOWN_PROSE.override(gopher_repetition=False)), readme) is True


def test_quality_params_errors_name_the_field():
    with pytest.raises(ValueError, match="min_alpha_words_ratio"):
        QualityParams(min_alpha_words_ratio=1.5)
    with pytest.raises(TypeError, match="no_such_rule"):
        QualityParams().override(no_such_rule=1)


# ----------------------------------------------------------------------------------------------- language filter --
@pytest.mark.parametrize("text, lang", [(PROSE, "en"), (GERMAN, "de"), (FRENCH, "fr")])
def test_language_tags(text, lang):
    result, doc = run_filter(LanguageID(["en", "de", "fr"]), text)
    assert result is True
    assert doc.metadata["language"] == lang and doc.metadata["language_score"] > 0.65


def test_language_drops_other_and_unsure():
    assert run_filter(LanguageID("en"), GERMAN)[0] == (False, "language_other")
    assert run_filter(LanguageID("en", threshold=0.999), PROSE)[0] == (False, "language_low_score")
    result, doc = run_filter(LanguageID(None), GERMAN)
    assert result is True and doc.metadata["language"] == "de"


# ---------------------------------------------------------------------------------------------------- odd input --
ODD = ["", " \n\t ", "\ud800 lone surrogate", "\x00\x01 control", "🙂" * 500, "\u202e\u0301\u0301", "a" * 300_000,
       "word " * 120_000, ":" * 50_000]


def test_odd_input_is_dropped_with_a_reason_or_passed():
    steps = [NormalizeUnicode(), LanguageID(), GopherPrecheck(100_000, 1000), RedactPII(),
             DecontaminationFilter(default_index(benchmarks=("passkey",)))]
    for text in ODD:
        for step in steps:
            doc = Document(text=text, id="odd")
            result = step.format(text) if isinstance(step, (NormalizeUnicode, RedactPII)) else step.filter(doc)
            assert result is True or isinstance(result, str) or (result[0] is False and result[1]), (step, text[:9])
    # the stock blocks only ever see what the precheck let through
    for text in ODD[:6]:
        verdict = chain_verdict(quality_filters(), text)
        assert verdict is True or verdict[0] is False


# ------------------------------------------------------------------------------------------------------- chain --
def test_chain_runs_in_datatrove_executor_and_counts_reasons(tmp_path):
    docs = [
        Document(text=PROSE + "\nWrite to jane.doe@example.com for a visit to the mill.", id="good",
                 metadata={"source": "prose", "order": 0}),
        Document(text=GERMAN, id="german", metadata={"source": "prose", "order": 1}),
        Document(text="\n".join(["Click here to subscribe to our newsletter today."] * 20), id="spam",
                 metadata={"source": "prose", "order": 2}),
        Document(text=PROSE + "\n" + PASSKEY_TASK,
                 id="leak", metadata={"source": "prose", "order": 3}),
    ]
    kept = []

    def collect(data, rank=0, world_size=1):
        for doc in data:
            kept.append((doc.id, doc.text, dict(doc.metadata)))
            yield doc

    pipeline = [docs, NormalizeUnicode(), LanguageID("en"), *quality_filters(), RedactPII(),
                DecontaminationFilter(default_index(benchmarks=("passkey",)))]
    for step in pipeline[1:]:
        pickle.loads(pickle.dumps(step))       # executors ship pipelines to workers by pickling them
    LocalPipelineExecutor(pipeline=pipeline + [collect], tasks=1, workers=1,
                          logging_dir=str(tmp_path / "logs")).run()

    assert [k[0] for k in kept] == ["good"]
    assert "<EMAIL>" in kept[0][1] and kept[0][2]["pii"] == {"email": 1} and kept[0][2]["language"] == "en"
    stats = json.loads((tmp_path / "logs" / "stats.json").read_text())
    counters = {key: value for block in stats for key, value in block["stats"].items() if isinstance(value, int)}
    assert counters["dropped_language_other"] == 1
    assert counters["dropped_dup_line_frac"] == 1
    assert counters["dropped_decontaminated"] == 1
