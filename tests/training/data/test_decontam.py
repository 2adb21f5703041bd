"""Decontamination (DeepSeek-Coder §2.1): 10-gram match against test data, exact match for 3..9-token strings."""
import inspect
import textwrap

import pytest
from datatrove.data import Document

from training.data.curate.decontam import BenchmarkIndex, DecontaminationFilter, default_index
from training.benchmarks_data import draw_arith_items, load_humaneval_problems


@pytest.fixture(scope="module")
def decontaminate():
    return DecontaminationFilter(default_index())


def test_humaneval_solution_embedded_in_code_is_removed_and_attributed(decontaminate):
    problem = load_humaneval_problems()[23]
    text = ("import os\n\n\ndef helper(path):\n    return os.path.basename(path)\n\n\n"
            + problem["prompt"] + problem["canonical_solution"]
            + "\n\nif __name__ == '__main__':\n    print(helper('/tmp/x'))\n")
    doc = Document(text=text, id="leak")
    assert decontaminate.filter(doc) == (False, "decontaminated")
    assert doc.metadata["contaminated_by"] == f"humaneval/{problem['task_id']}" == "humaneval/HumanEval/23"


def test_reindented_copy_still_matches(decontaminate):
    problem = load_humaneval_problems()[0]
    text = textwrap.indent(problem["prompt"] + problem["canonical_solution"], "        ").upper()
    doc = Document(text=text, id="reindented")
    assert decontaminate.filter(doc) == (False, "decontaminated")
    assert doc.metadata["contaminated_by"] == "humaneval/HumanEval/0"


@pytest.mark.parametrize("module", ["textwrap", "json.encoder", "shlex", "fractions"])
def test_unrelated_stdlib_code_stays(decontaminate, module):
    source = inspect.getsource(__import__(module, fromlist=["_"]))
    doc = Document(text=source, id=module)
    assert decontaminate.filter(doc) is True and "contaminated_by" not in doc.metadata


def test_arithmetic_eval_item_is_caught(decontaminate):
    item = draw_arith_items(20, 1234)[5]          # the evaluate stage's default draw (seed 1234, 20 problems)
    doc = Document(text=f"Homework.\nQ: {item.question}\nA: {item.answer}\n", id="homework")
    assert decontaminate.filter(doc) == (False, "decontaminated")
    assert doc.metadata["contaminated_by"] == "arith/arith-5"


def test_short_strings_use_exact_match():
    index = BenchmarkIndex.build({"b/short": "What is 37 + 45?", "b/too_short": "x y"})
    step = DecontaminationFilter(index)
    assert step.filter(Document(text="so, WHAT IS 37+45 ? asked Bob", id="a")) == (False, "decontaminated")
    assert step.filter(Document(text="What is 37 - 45?", id="b")) is True      # operators are tokens
    assert step.filter(Document(text="What is 37 + 46?", id="c")) is True
    assert step.filter(Document(text="x y z", id="d")) is True                # < 3 tokens: not indexed
    assert index.sizes == {"b": 1}


def test_long_strings_match_on_any_shared_10_gram_only():
    text = "one two three four five six seven eight nine ten eleven twelve"
    step = DecontaminationFilter(BenchmarkIndex.build({"b/long": text}))
    assert step.filter(Document(text="prefix " + " ".join(text.split()[2:]) + " suffix", id="a")) == \
        (False, "decontaminated")
    assert step.filter(Document(text=" ".join(text.split()[:9]), id="b")) is True    # only 9 tokens shared


def test_unknown_benchmark_is_named():
    with pytest.raises(ValueError, match="mbpp"):
        default_index(benchmarks=("humaneval", "mbpp"))
