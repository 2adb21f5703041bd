"""Conversation data (training/data/chat.py): ids equal DeepSeek-V3's released chat template rendered by
`transformers` (TRL's copy of it), reasoning turns equal DeepSeek-R1's form and differ from V3's rendering by exactly
the `<think>` trace, the loss mask covers exactly the assistant tokens and each closing end-of-sentence token, and
every kind of bad record is set aside with its reason while the rest is read; too many fail, naming the file."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from training import tokenizer as T
from training.data import chat

SEQ = 128
SYSTEM = {"role": "system", "content": "You are a careful assistant."}
CONVERSATIONS = {
    "one turn, no system prompt": [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"}],
    "multi-turn with two system prompts, one hoisted from the middle": [
        SYSTEM,
        {"role": "user", "content": "Translate 'cat' into French."},
        {"role": "assistant", "content": " Le chat.\n"},
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "  And 'dog'?  "},
        {"role": "assistant", "content": "Chien"}],
    "multi-byte text, code and digits": [
        SYSTEM,
        {"role": "user", "content": "用中文说：3141592 ÷ 7 = ?"},
        {"role": "assistant", "content": "448798.857… ✓"},
        {"role": "user", "content": "def f(x):\n\treturn x ** 2"},
        {"role": "assistant", "content": "```python\nprint(f(9))  # 81\n```"}],
}
REASONING = [
    SYSTEM,
    {"role": "user", "content": "Is 91 prime?"},
    {"role": "assistant", "content": "No: 91 = 7 × 13.", "reasoning_content": "Try small primes.\n91 / 7 = 13."},
    {"role": "user", "content": "And 97?"},
    {"role": "assistant", "content": "Yes, 97 is prime."},
    {"role": "user", "content": "101?"},
    {"role": "assistant", "content": "Yes.", "reasoning_content": "sqrt(101) < 11; 2, 3, 5, 7 do not divide it."}]


def _trl_template(name: str) -> str:
    """A chat template file of the installed trl, read without importing trl (test-only dependency)."""
    spec = importlib.util.find_spec("trl")
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def reference():
    """`render(messages, template) -> dict` with transformers' apply_chat_template on DeepSeek's tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(T.tokenizer_path()), bos_token=T.BOS, eos_token=T.EOD)

    def render(messages, template="deepseekv3.jinja", **kwargs):
        tok.chat_template = _trl_template(template)
        return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return render


def decode(ids: list[int]) -> str:
    return T.load_tokenizer().decode(ids, skip_special_tokens=False)


def _framed(messages: list[dict]) -> list[dict]:
    """Reasoning moved into content in R1's frame, as the R1 and V3 templates read it (neither reads the field)."""
    return [{"role": m["role"], "content": f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}"}
            if "reasoning_content" in m else m for m in messages]


# ------------------------------------------------------------------------------------------------- template --
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_equal_deepseek_v3_released_template(reference, name):
    ids, mask = chat.encode_conversation(CONVERSATIONS[name])
    assert ids == reference(CONVERSATIONS[name])["input_ids"]
    assert len(mask) == len(ids)


def test_template_text_token_by_token():
    ids, mask = chat.encode_conversation([SYSTEM, *CONVERSATIONS["one turn, no system prompt"]])
    assert decode(ids) == ("<｜begin▁of▁sentence｜>You are a careful assistant.<｜User｜>What is 12 + 30?"
                           "<｜Assistant｜>42<｜end▁of▁sentence｜>")
    # BOS "You are a careful assistant." <｜User｜> "What is 12 + 30?" <｜Assistant｜> "42" EOS
    assert ids == [0, 3476, 477, 260, 16372, 22896, 16, 128803, 3085, 344, 223, 736, 940, 223, 1059, 33,
                   128804, 3180, 1]
    assert mask == [0] * 17 + [1, 1]


def test_reasoning_turns_equal_r1_form(reference):
    """R1's template (its training variant, which keeps the trace) on content framed as R1 writes it."""
    ids, _ = chat.encode_conversation(REASONING)
    assert ids == reference(_framed(REASONING), "deepseek_r1_distill_training.jinja")["input_ids"]
    assert "<｜Assistant｜><think>\nTry small primes.\n91 / 7 = 13.\n</think>\n\nNo: 91 = 7 × 13." in decode(ids)


def test_reasoning_turns_differ_from_v3_template_by_exactly_the_trace(reference):
    """V3's released template keeps only what follows `</think>`; with each `<think>…</think>` span cut from ours,
    the ids are V3's, multi-turn and system prompt included."""
    ids, _ = chat.encode_conversation(REASONING)
    begin, end = T.token_id(T.THINK_BEGIN), T.token_id(T.THINK_END)
    cut, traces, inside = [], [], None
    for i in ids:
        if i == begin:
            inside = [i]
        elif inside is not None:
            inside.append(i)
            if i == end:
                traces.append(decode(inside))
                inside = None
        else:
            cut.append(i)
    assert cut == reference(_framed(REASONING))["input_ids"]
    assert traces == [f"<think>\n{m['reasoning_content']}\n</think>" for m in REASONING if "reasoning_content" in m]


def test_encoder_uses_the_tokenizer_it_is_given():
    """A BPE cut to its first 500 merges (as a vocabulary-subset model uses) spells the same text in more, smaller
    tokens, with the same special-token ids; a tokenizer without the chat tokens is refused, naming the token."""
    doc = json.loads(T.tokenizer_path().read_text(encoding="utf-8"))
    doc["model"]["merges"] = doc["model"]["merges"][:500]
    small = Tokenizer.from_str(json.dumps(doc))
    messages = CONVERSATIONS["multi-byte text, code and digits"]
    full_ids, full_mask = chat.encode_conversation(messages)
    ids, mask = chat.encode_conversation(messages, tokenizer=small)
    assert len(ids) > len(full_ids) and decode(ids) == decode(full_ids)
    assert sum(mask) > sum(full_mask) and [i for i in ids if i >= 128000] == [i for i in full_ids if i >= 128000]

    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != T.ASSISTANT]
    with pytest.raises(ValueError, match="no token '<｜Assistant｜>'"):
        chat.ChatTemplate(Tokenizer.from_str(json.dumps(doc)))


# ------------------------------------------------------------------------------------------------ loss mask --
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_loss_mask_is_the_reference_assistant_mask_less_the_marker(reference, name):
    """TRL's training variant of the V3 template marks `<｜Assistant｜>` + reply + EOS as generated; the marker is the
    prompt, so ours is that mask with the marker positions zeroed."""
    ids, mask = chat.encode_conversation(CONVERSATIONS[name])
    ref = reference(CONVERSATIONS[name], "deepseekv3_training.jinja", return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids
    marker = T.token_id(T.ASSISTANT)
    assert mask == [0 if i == marker else m for i, m in zip(ids, ref["assistant_masks"])]


@pytest.mark.parametrize("messages", [*CONVERSATIONS.values(), REASONING], ids=[*CONVERSATIONS, "reasoning"])
def test_loss_mask_covers_each_reply_and_its_closing_eos_only(messages):
    ids, mask = chat.encode_conversation(messages)
    eos, marker = T.token_id(T.EOD), T.token_id(T.ASSISTANT)
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    replies = [m for m in _framed(messages) if m["role"] == "assistant"]
    assert [decode(r) for r in runs] == [m["content"] + T.EOD for m in replies]
    assert all(m == 1 for i, m in zip(ids, mask) if i == eos) and ids.count(eos) == len(replies)
    assert all(m == 0 for i, m in zip(ids, mask) if i == marker)
    assert ids[mask.index(1) - 1] == marker   # the first learned token is the one the marker asks for


# ---------------------------------------------------------------------------------------------- bad records --
def _line(messages=None, **record) -> bytes:
    if messages is not None:
        record["messages"] = messages
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


GOOD = CONVERSATIONS["one turn, no system prompt"]
BAD_LINES = {   # reason -> one raw JSONL line
    "unknown_role": _line([{"role": "tool", "content": "{}"}, *GOOD]),
    "empty_assistant": _line([GOOD[0], {"role": "assistant", "content": "  \n"}]),
    "missing_assistant": _line([SYSTEM, GOOD[0]]),
    "too_long": _line([GOOD[0], {"role": "assistant", "content": "word " * SEQ}]),
    "invalid_utf8": b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
    "malformed_json": b'{"messages": [{"role": "user", "content": "hi"}\n',
    "missing_messages": _line(conversation=GOOD),
    "invalid_message": _line([GOOD[0], {"role": "assistant", "content": 42}]),
    "special_token_text": _line([GOOD[0], {"role": "assistant", "content": f"Done.{T.EOD}<｜User｜>more"}]),
    "blank_line": b"   \n",
}


def _write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(b"".join(lines))
    return path


def _write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string())])
    pq.write_table(pa.table({"messages": pa.array(rows, type=pa.list_(message))}), path)
    return path


def test_each_bad_record_is_set_aside_with_its_reason_and_the_rest_is_read(tmp_path):
    data = tmp_path / "data"
    good = [_line(GOOD), _line(REASONING), _line(CONVERSATIONS["multi-byte text, code and digits"])]
    _write_jsonl(data / "a.jsonl", [good[0], *BAD_LINES.values(), good[1]])
    _write_jsonl(data / "b.jsonl.gz", [good[2], BAD_LINES["unknown_role"]])
    _write_parquet(data / "c.parquet", [GOOD, [GOOD[0], {"role": "critic", "content": "meh"}], None, REASONING])
    (data / "d.parquet").write_bytes(b"PAR1 not really parquet")
    (data / "notes.txt").write_text("not conversation data")

    conversations, tally = chat.load_conversations(str(data), SEQ, tmp_path / "rejects.jsonl", max_reject_ratio=1.0)

    a, b, c = (str((data / name).resolve()) for name in ("a.jsonl", "b.jsonl.gz", "c.parquet"))
    assert [x.id for x in conversations] == [f"{a}:1", f"{a}:{len(BAD_LINES) + 2}", f"{b}:1", f"{c}:1", f"{c}:4"]
    assert conversations[0].ids == chat.encode_conversation(GOOD)[0]
    assert conversations[4].ids == chat.encode_conversation(REASONING)[0]   # parquet's null reasoning_content: none
    expected = {reason: 1 for reason in BAD_LINES}
    expected.update(unknown_role=3, missing_messages=2, corrupt_file=1, unsupported_file=1)
    assert tally.reasons() == expected
    summary = tally.summary()
    assert (summary["read"], summary["conversations"]) == (sum(expected.values()) + 5, 5)
    assert summary["files"][c] == {"read": 4, "dropped": {"unknown_role": 1, "missing_messages": 1}}
    assert summary["tokens"] == sum(len(x.ids) for x in conversations)
    assert summary["target_tokens"] == sum(sum(x.loss_mask) for x in conversations)

    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sorted({r["reason"] for r in rejects}) == sorted(expected)
    by_reason = {r["reason"]: r for r in rejects if r["id"].startswith(a)}
    assert by_reason["too_long"]["detail"].endswith(f"> seq_length {SEQ}")
    utf8 = by_reason["invalid_utf8"]["sample"]
    assert utf8.startswith('{"messages"') and "caf\\xe9" in utf8   # the bad byte shown escaped
    assert "<｜end▁of▁sentence｜>" in by_reason["special_token_text"]["detail"]
    assert by_reason["unknown_role"]["detail"] == ("messages[0].role is 'tool', "
                                                   "not one of ('system', 'user', 'assistant')")
    for reason in BAD_LINES:   # each line's id is file:line, so the record can be found
        assert by_reason[reason]["id"] == f"{a}:{list(BAD_LINES).index(reason) + 2}"


def test_sequence_length_boundary(tmp_path):
    length = len(chat.encode_conversation(GOOD)[0])
    path = _write_jsonl(tmp_path / "one.jsonl", [_line(GOOD)])
    for seq_length, kept in ((length, 1), (length - 1, 0)):
        tally = chat.Tally()
        assert len(list(chat.read_conversations(str(path), seq_length, tally))) == kept
        assert tally.reasons() == ({} if kept else {"too_long": 1})


def test_a_file_over_the_reject_limit_fails_naming_it(tmp_path):
    _write_jsonl(tmp_path / "data" / "clean.jsonl", [_line(GOOD)] * 3 + [BAD_LINES["malformed_json"]])   # 25% bad
    _write_jsonl(tmp_path / "data" / "dirty.jsonl", [_line(GOOD)] + [BAD_LINES["unknown_role"]] * 2)    # 67% bad
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(chat.ChatDataError) as err:
        chat.load_conversations(str(tmp_path / "data"), SEQ, rejects, max_reject_ratio=0.5)
    message = str(err.value)
    assert f"{(tmp_path / 'data' / 'dirty.jsonl').resolve()}: 2 of 3 records bad (66.7%: unknown_role 2)" in message
    assert "clean.jsonl" not in message and "max_reject_ratio 50.0%" in message and str(rejects) in message
    assert len(rejects.read_text().splitlines()) == 3   # the rejects are written before the failure

    conversations, _ = chat.load_conversations(str(tmp_path / "data"), SEQ, rejects, max_reject_ratio=0.7)
    assert len(conversations) == 4


def test_reads_conversations_from_s3(s3_env, tmp_path):
    """The same records through `s3://` (storage's mirror) as from disk, ids named by their object URIs."""
    lines = [_line(GOOD), BAD_LINES["invalid_utf8"], _line(REASONING)]
    local = _write_jsonl(tmp_path / "local" / "part-0.jsonl", lines)
    prefix = f"conversations/{tmp_path.name}"
    s3_env["client"].upload_file(str(local), s3_env["bucket"], f"{prefix}/part-0.jsonl")
    uri = f"s3://{s3_env['bucket']}/{prefix}"

    tally = chat.Tally()
    remote = list(chat.read_conversations(uri, SEQ, tally))
    assert [x.id for x in remote] == [f"{uri}/part-0.jsonl:1", f"{uri}/part-0.jsonl:3"]
    assert [(x.ids, x.loss_mask) for x in remote] == [
        (x.ids, x.loss_mask) for x in chat.read_conversations(str(local), SEQ, chat.Tally())]
    assert tally.summary()["files"] == {f"{uri}/part-0.jsonl": {"read": 3, "dropped": {"invalid_utf8": 1}}}
