"""Rejection sampling of teacher traces (training/data/traces.py): only completions that ended on their own and check
as correct are kept, each distinct reply once per prompt; the rest are counted (and sampled) by reason; a kept
trace renders back to exactly the teacher's text in the chat template."""
from __future__ import annotations

import pytest

from training import tokenizer as T
from training.data import traces
from training.data.chat import ChatTemplate, Message, encode_conversation, parse_messages
from training.verify import tasks

ITEMS = tasks.generate("sort", "train", 3, seed=0) + tasks.generate("countdown", "train", 1, seed=0)


def _completion(text: str, ended: bool = True) -> traces.Completion:
    return traces.Completion(text, traces.ENDED if ended else "max_new_tokens")


def _sampled() -> list[list[traces.Completion]]:
    sort_a, sort_b, _, countdown = ITEMS
    return [
        [_completion(sort_a.answer), _completion(sort_a.answer), _completion("9 9 9")],          # kept, dup, wrong
        [_completion(sort_b.answer, ended=False), _completion("<think>\nsmallest first\n</think>\n\n" + sort_b.answer)],
        [_completion("no idea"), _completion("")],                                               # wrong, wrong
        [_completion(countdown.answer), _completion(countdown.answer.replace(" ", "")), _completion("1 + 1")],
    ]


def test_only_finished_correct_distinct_replies_are_kept_and_every_sample_is_counted():
    sampled = _sampled()
    correct = [traces.grade([item] * len(samples), [c.text for c in samples]) for item, samples in zip(ITEMS, sampled)]
    chosen = traces.select(ITEMS, sampled, correct)
    summary = chosen.summary()
    assert {k: summary[k] for k in ("sampled", "correct", "kept", "duplicates", "unfinished", "wrong")} == {
        "sampled": 10, "correct": 5, "kept": 4, "duplicates": 1, "unfinished": 1, "wrong": 4}
    assert summary["rejection_rate"] == pytest.approx(5 / 10)
    assert summary["prompts"] == 4 and summary["prompts_kept"] == 3
    assert summary["tasks"]["countdown"] == {"sampled": 3, "correct": 2, "kept": 2, "duplicates": 0,
                                             "unfinished": 0, "wrong": 1, "rejection_rate": pytest.approx(1 / 3)}
    # The unfinished reply held the right answer: it is rejected all the same (the teacher never closed its turn).
    assert [(r["id"], r["sample"]) for r in chosen.records] == [
        (ITEMS[0].id, 0), (ITEMS[1].id, 1), (ITEMS[3].id, 0), (ITEMS[3].id, 1)]
    by_id = {item.id: item for item in ITEMS}
    for record in chosen.records:
        reply = parse_messages(record)[-1]
        assert tasks.check(by_id[record["id"]], reply.content) and record["messages"][0]["content"] == \
            by_id[record["id"]].prompt
    rejected = {(r["id"], r["sample"]): r["reason"] for r in chosen.rejected}
    assert rejected == {(ITEMS[0].id, 2): "wrong", (ITEMS[1].id, 0): "unfinished", (ITEMS[2].id, 0): "wrong",
                        (ITEMS[2].id, 1): "wrong", (ITEMS[3].id, 2): "wrong"}


def test_rejected_completions_are_sampled_but_all_counted():
    item = ITEMS[0]
    many = [[_completion(f"wrong {i}") for i in range(traces.REJECT_SAMPLES + 7)]]
    chosen = traces.select([item], many, [[False] * len(many[0])])
    assert chosen.summary()["wrong"] == traces.REJECT_SAMPLES + 7 and len(chosen.rejected) == traces.REJECT_SAMPLES
    assert chosen.records == [] and chosen.summary()["rejection_rate"] == 1.0


def test_a_reasoning_trace_renders_back_to_the_teachers_own_text():
    """The student learns exactly what the teacher wrote: the record, in the chat template, holds the completion's
    ids after <｜Assistant｜>, then the end-of-sentence."""
    template = ChatTemplate()
    text = "<think>\nsmallest first: 2, then 5\n</think>\n\n2 5 8"
    record = traces.trace_record(ITEMS[0], _completion(text), sample=3)
    assert record["messages"][1] == {"role": "assistant", "content": "2 5 8",
                                     "reasoning_content": "smallest first: 2, then 5"}
    ids, mask = encode_conversation(record["messages"])
    prompt = template.prompt([Message("user", ITEMS[0].prompt)])
    assert ids[:len(prompt)] == prompt
    assert template.tokenizer.decode(ids[len(prompt):], skip_special_tokens=False) == text + T.EOD
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


@pytest.mark.parametrize("text, expected", [
    ("2 5 8", (None, "2 5 8")),
    ("<think>\na\nb\n</think>\n\n2 5 8", ("a\nb", "2 5 8")),
    ("<think>\n</think>\n\nx", ("", "x")),
    ("first</think>second</think>\n\nlast", ("first</think>second", "last")),   # the last </think> closes it
])
def test_split_reasoning(text, expected):
    assert traces.split_reasoning(text) == expected
