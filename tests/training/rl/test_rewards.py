"""GRPO's rule-based rewards on hand-written completions: the two formats, answer extraction, math-verify accuracy,
the task suite's checkers (code in the sandbox, a hung program included), language consistency and the combination."""
import threading
import time

import pytest

from training.rl import rewards as R
from training.verify.spec import Limits
from training.verify.tasks import TaskItem, generate


def zero(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think> <answer>{answer}</answer>"


def r1(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"   # what training/data/chat.py renders


# ------------------------------------------------------------------------------------------------- format --
WELL_FORMED_ZERO = [
    "<think>2 and 2 make 4</think><answer>4</answer>",
    "<think>\n2 and 2 make 4\n</think>\n<answer>\n4\n</answer>\n",
    "  <think>a\nmulti-line\nthought</think>  \n  <answer>4</answer>  ",
]
MALFORMED_ZERO = {
    "missing think": "<answer>4</answer>",
    "missing answer": "<think>2 and 2 make 4</think>",
    "missing closer": "<think>2 and 2 make 4</think><answer>4",
    "no tags": "4",
    "answer before think": "<answer>4</answer><think>2 and 2 make 4</think>",
    "nested think": "<think>outer<think>inner</think>still</think><answer>4</answer>",
    "answer inside think": "<think>so <answer>4</answer></think><answer>4</answer>",
    "repeated think": "<think>a</think><think>b</think><answer>4</answer>",
    "repeated answer": "<think>a</think><answer>4</answer><answer>5</answer>",
    "two rounds": "<think>a</think><answer>4</answer><think>b</think><answer>5</answer>",
    "text before": "Sure! <think>a</think><answer>4</answer>",
    "text between": "<think>a</think> so: <answer>4</answer>",
    "text after": "<think>a</think><answer>4</answer> Hope this helps.",
    "blank answer": "<think>a</think><answer>  </answer>",
    "blank reasoning": "<think> </think><answer>4</answer>",
    "stray closer": "<think>a</think></think><answer>4</answer>",
}


@pytest.mark.parametrize("completion", WELL_FORMED_ZERO)
def test_r1_zero_format_accepts_one_think_block_then_one_answer_block(completion):
    assert R.format_reward(completion) == 1.0
    assert R.extract_answer(completion) == "4"


@pytest.mark.parametrize("name", MALFORMED_ZERO)
def test_r1_zero_format_refuses_malformed_completions(name):
    completion = MALFORMED_ZERO[name]
    assert R.format_reward(completion) == 0.0
    assert R.extract_answer(completion) is None and R.extract_reasoning(completion) is None


def test_r1_format_is_what_the_chat_template_renders():
    completion = r1("2 and 2 make 4", "The answer is 4.")
    assert R.format_reward(completion, "r1") == 1.0
    assert R.extract_answer(completion, "r1") == "The answer is 4."
    assert R.extract_reasoning(completion, "r1") == "2 and 2 make 4"
    assert R.format_reward(completion, "r1-zero") == 0.0          # no answer tags: not the R1-Zero shape
    assert R.format_reward(zero("a", "4"), "r1") == 0.0           # answer tags: not R1's shape either
    for bad in ["The answer is 4.",                                # no reasoning
                "<think>\n2 and 2 make 4\n</think>\n\n",           # no answer after it
                "4 <think>\nhm\n</think>\n\n4",                    # text before the reasoning
                "<think>\na\n</think>\n\n4<think>\nb\n</think>\n\n5",   # repeated
                "<think>\na<think>b</think>\n</think>\n\n4",       # nested
                "<think>\nnever closed\n\n4"]:
        assert R.format_reward(bad, "r1") == 0.0 and R.extract_answer(bad, "r1") is None, bad


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="fmt must be one of"):
        R.format_reward("<think>a</think><answer>4</answer>", "r2")


# ---------------------------------------------------------------------------------------------- math accuracy --
@pytest.mark.parametrize("answer, reference", [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "\\dfrac{1}{2}"),
    ("2", "$x=2$"),
    ("$x = 2$", "2"),
    ("\\frac{10}{2}", "5"),
    ("1.41421356", "\\sqrt{2}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{2, 1\\}", "\\{1,2\\}"),
    ("The answer is 3", "3"),
    ("$3$ apples", "3"),
    ("\\boxed{42}", "42"),
])
def test_math_accuracy_accepts_equivalent_answers(answer, reference):
    assert R.math_accuracy(zero("working it out", answer), reference) == 1.0
    assert R.math_accuracy(r1("working it out", answer), reference, fmt="r1") == 1.0


@pytest.mark.parametrize("answer, reference", [
    ("0.51", "\\frac{1}{2}"),
    ("\\frac{1}{3}", "0.5"),
    ("1.414", "\\sqrt{2}"),           # rounded too far
    ("x=3", "2"),
    ("y+1", "x+1"),                   # a different variable
    ("(2,1)", "(1,2)"),
    ("4, 5", "5"),                    # the whole answer counts, not its last number
    ("\\{2, 1\\}", "1"),
    ("two", "2"),                      # words are not numbers
    ("}}}{{{\\frac", "3"),            # unparsable
    ("$\\frac{1}{2", "\\frac{1}{2}"),  # unbalanced
    ("", "3"),
])
def test_math_accuracy_refuses_wrong_or_unparsable_answers(answer, reference):
    assert R.math_accuracy(zero("working it out", answer), reference) == 0.0


def test_math_accuracy_of_a_malformed_completion_is_zero_even_when_the_answer_is_right():
    assert R.math_accuracy("<answer>0.5</answer>", "\\frac{1}{2}") == 0.0
    assert R.math_accuracy("0.5", "\\frac{1}{2}") == 0.0
    assert R.math_accuracy("<think>a</think><answer>0.5</answer><answer>0.5</answer>", "0.5") == 0.0


def test_math_accuracy_gives_up_on_a_pathological_answer_in_time():
    started = time.monotonic()
    assert R.math_accuracy(zero("big", "10^{10^{10^{10}}}"), "1", timeout_s=1) == 0.0
    assert time.monotonic() - started < 5.0


def test_math_accuracy_runs_off_the_main_thread_without_raising():
    # math-verify's SIGALRM timeout works only in the main thread; elsewhere the reward runs it without one
    got = []
    worker = threading.Thread(target=lambda: got.append(R.math_accuracy(zero("half", "0.5"), "\\frac{1}{2}")))
    worker.start()
    worker.join(timeout=30)
    assert got == [1.0]


# ---------------------------------------------------------------------------------------- task-suite accuracy --
@pytest.mark.parametrize("task", ["sort", "add", "reverse", "countdown"])
def test_task_accuracy_applies_the_suites_checkers_to_the_extracted_answer(task):
    items = generate(task, "heldout", 4)
    right = [zero("let me work it out", item.answer) for item in items]
    wrong = [zero("let me work it out", item.answer + " 1") for item in items]
    bare = [item.answer for item in items]                       # right answer, no format
    assert R.task_accuracy(right, items) == [1.0] * 4
    assert R.task_accuracy(wrong, items) == [0.0] * 4
    assert R.task_accuracy(bare, items) == [0.0] * 4
    assert R.task_accuracy([r1("let me work it out", i.answer) for i in items], items, fmt="r1") == [1.0] * 4


def test_countdown_accepts_another_correct_expression():
    item = TaskItem("countdown", "Make 46 from 3 7 25 with + - *", "(3 * 7) + 25", ((3, 7, 25), 46))
    assert R.task_accuracy([zero("7 times 3 is 21", "25 + 7 * 3"), zero("hm", "25 + 21")], [item, item]) == [1.0, 0.0]


def test_code_is_run_in_the_sandbox_in_one_batch_passing_and_failing():
    item = generate("code", "heldout", 1)[0]
    k = int(item.prompt.split("x * ")[1].split(" +")[0])
    fenced = f"```python\n{item.answer}\n```"
    completions = [zero("a linear function", item.answer), zero("fenced", fenced),
                   zero("off by one", item.answer + " + 1"), zero("crashes", "def f(x):\n    return 1 / 0"),
                   item.answer,                                               # right code, no format
                   zero("close", f"def f(x):\n    return x * {k}")]
    assert R.task_accuracy(completions, [item] * len(completions)) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_code_that_never_ends_scores_zero_and_the_reward_returns_promptly():
    item = generate("code", "heldout", 1)[0]
    hang = zero("loop", "def f(x):\n    while True:\n        pass")
    started = time.monotonic()
    scores = R.task_accuracy([hang, zero("right", item.answer)], [item, item], limits=Limits(wall_s=1.0, cpu_s=1))
    assert scores == [0.0, 1.0]
    assert time.monotonic() - started < 8.0


def test_accuracy_dispatches_task_items_and_math_references():
    add = TaskItem("add", "Add: 47 + 385", "432")
    completions = [zero("47 + 385", "432"), zero("half", "0.5"), zero("half", "0.6"), zero("47 + 385", "433")]
    assert R.accuracy(completions, [add, "\\frac{1}{2}", "\\frac{1}{2}", add]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="TaskItem or a math answer"):
        R.accuracy([zero("a", "1")], [1])


# ------------------------------------------------------------------------------------- language consistency --
def test_language_consistency_is_the_share_of_target_language_words_in_the_reasoning():
    english = "First add the ones: 7 + 5 = 12, carry 1."
    assert R.language_consistency(zero(english, "432")) == 1.0
    # Chinese reasoning for an English target: no English words (digits and symbols are no words)
    chinese = "先把个位相加：7 + 5 = 12，进一"
    assert R.language_consistency(zero(chinese, "432")) == 0.0
    assert R.language_consistency(zero(chinese, "432"), language="zh") == 1.0
    # mixed: 4 English words, 4 Han characters (each a word) -> half
    mixed = "First add the ones 个位相加"
    assert R.language_consistency(zero(mixed, "432")) == pytest.approx(0.5)
    assert R.language_consistency(zero(mixed, "432"), language="zh") == pytest.approx(0.5)
    # accented letters are not ASCII: "café" is not counted as English
    assert R.language_consistency(zero("the café", "1")) == pytest.approx(0.5)
    # only the reasoning counts, not the answer
    assert R.language_consistency(zero("add them", "四百三十二")) == 1.0
    assert R.language_consistency(r1(chinese, "432"), fmt="r1") == 0.0


def test_language_consistency_without_words_or_format_is_zero():
    assert R.language_consistency(zero("7 + 5 = 12; 12 * 3 = 36", "36")) == 0.0   # no words to be consistent in
    assert R.language_consistency("First add the ones. 432") == 0.0                 # malformed
    with pytest.raises(ValueError, match="language must be one of"):
        R.language_share("hello", "fr")


# ------------------------------------------------------------------------------------------ combine and log --
def test_combine_weighs_each_reward_and_means_are_logged_per_reward():
    scores = {"format": [1.0, 1.0, 0.0], "accuracy": [1.0, 0.0, 0.0], "language": [0.5, 1.0, 0.0]}
    assert R.combine(scores, {"format": 0.5, "accuracy": 1.0, "language": 1.0}) == pytest.approx([2.0, 1.5, 0.0])
    assert R.combine(scores, {"format": 0.0, "accuracy": 2.0, "language": 0.0}) == pytest.approx([2.0, 0.0, 0.0])
    assert R.means(scores) == pytest.approx({"reward/format": 2 / 3, "reward/accuracy": 1 / 3,
                                             "reward/language": 0.5})
    with pytest.raises(ValueError, match="weights name"):
        R.combine(scores, {"format": 1.0, "accuracy": 1.0})              # a reward left without a weight
    with pytest.raises(ValueError, match="weights name"):
        R.combine(scores, {"format": 1.0, "accuracy": 1.0, "langauge": 1.0})
    with pytest.raises(ValueError, match="every reward must score every completion"):
        R.combine({"a": [1.0], "b": [1.0, 0.0]}, {"a": 1.0, "b": 1.0})


def test_standard_rewards_score_a_batch_end_to_end():
    add = TaskItem("add", "Add: 47 + 385", "432")
    completions = [zero("add the ones, then the tens", "432"),   # right, formatted, English
                   zero("先加个位", "432"),                        # right, formatted, Chinese reasoning
                   "432",                                         # right but malformed
                   zero("half of one", "0.5")]                    # math reference
    scores = R.score_all(R.standard(), completions, [add, add, add, "\\frac{1}{2}"])
    assert scores == {"format": [1.0, 1.0, 0.0, 1.0], "accuracy": [1.0, 1.0, 0.0, 1.0],
                      "language": [1.0, 0.0, 0.0, 1.0]}
    # R1 §2.3.2 sums accuracy and language consistency directly
    assert R.combine(scores, {"format": 0.0, "accuracy": 1.0, "language": 1.0}) == [2.0, 1.0, 0.0, 2.0]
    assert R.means(scores)["reward/language"] == 0.5
    assert [r.name for r in R.standard(language=None)] == ["format", "accuracy"]
    with pytest.raises(ValueError, match="distinct"):
        R.score_all([R.each("x", lambda c, r: 1.0)] * 2, ["a"], [None])
