"""The verifiable task suite: deterministic, disjoint splits, and checkers that accept right answers only."""
import pytest

from training.verify import tasks
from training.verify.tasks import TaskItem, check, generate, split_of


@pytest.mark.parametrize("task", tasks.TASKS)
def test_items_are_deterministic_distinct_and_in_their_split(task):
    train, heldout = generate(task, "train", 60, seed=3), generate(task, "heldout", 20, seed=3)
    assert train == generate(task, "train", 60, seed=3) and train != generate(task, "train", 60, seed=4)
    assert len({i.prompt for i in train}) == 60 and len({i.prompt for i in heldout}) == 20
    assert not {i.prompt for i in train} & {i.prompt for i in heldout}
    assert all(split_of(task, i.prompt) == "heldout" for i in heldout)
    # an item's split does not depend on the seed that drew it
    assert not {i.prompt for i in generate(task, "train", 200, seed=9)} & {i.prompt for i in heldout}


@pytest.mark.parametrize("task", ["sort", "add", "reverse", "countdown"])
def test_reference_answers_check_and_wrong_ones_do_not(task):
    for item in generate(task, "heldout", 30):
        assert check(item, item.answer), item
        assert check(item, f"  {item.answer}\n"), item              # whitespace around the reply is not the answer
        assert check(item, f"<think>\nlet me see\n</think>\n\n{item.answer}"), item
        assert not check(item, item.answer + " 1"), item
        assert not check(item, ""), item


@pytest.mark.parametrize("task", tasks.TASKS)
def test_a_cold_start_record_reasons_before_its_answer(task):
    """sft's `reasoning` records (R1 §2.3.1's cold-start form): a worked solution as the reasoning, the answer as the
    content, and the chat template renders them as R1's reasoning turn, which the checker accepts."""
    from training.data.chat import ChatTemplate, parse_messages
    from training.vocabulary import vocabulary

    item = generate(task, "train", 1)[0]
    record = item.conversation(reasoning=True)
    reply = record["messages"][1]
    assert reply["content"] == item.answer and reply["reasoning_content"] == tasks.worked_reasoning(item)
    assert "reasoning_content" not in item.conversation()["messages"][1]
    tok = vocabulary(3824).tokenizer
    ids, _ = ChatTemplate(tok).encode(parse_messages(record))
    text = tok.decode(ids, skip_special_tokens=False)
    assert f"<think>\n{reply['reasoning_content']}\n</think>\n\n{item.answer}" in text
    assert tasks.worked_reasoning(TaskItem("sort", "Sort ascending: 7 2 9 4", "2 4 7 9")) == (
        "4 digits, smallest first: 2, 4, 7, 9")


def test_known_items():
    assert check(TaskItem("sort", "Sort ascending: 7 2 9 4", "2 4 7 9"), "2 4 7 9")
    assert not check(TaskItem("sort", "Sort ascending: 7 2 9 4", "2 4 7 9"), "2 4 9 7")
    assert check(TaskItem("add", "Add: 47 + 385", "432"), "432")


def test_countdown_accepts_any_correct_expression_and_refuses_anything_else():
    item = TaskItem("countdown", "Make 46 from 3 7 25 with + - *", "(3 * 7) + 25", ((3, 7, 25), 46))
    assert check(item, "25 + 7 * 3") and check(item, "(7 * 3) + 25")
    assert not check(item, "25 + 25 - 4")                  # 25 twice, 4 not given
    assert not check(item, "25 + 21")                      # 21 is not one of the numbers
    assert not check(item, "__import__('os').getpid()")    # never evaluated: not an arithmetic expression
    assert not check(item, "46") and not check(item, "3 ** 7")


def test_code_items_are_checked_by_execution_in_the_sandbox():
    item = generate("code", "heldout", 1)[0]
    wrong = item.answer.replace("return x", "return -x")
    hostile = "import os\ndef f(x):\n    os.system('touch /tmp/seekflow-task-escape')\n    return 0"
    assert tasks.check_code_many([item, item, item], [item.answer, wrong, hostile]) == [True, False, False]
    assert check(item, f"```python\n{item.answer}\n```")


def test_unknown_task_or_split_is_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        generate("poetry", "train", 1)
    with pytest.raises(ValueError, match="split must be one of"):
        generate("sort", "test", 1)
