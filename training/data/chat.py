"""Conversation data for supervised fine-tuning: records of `messages`, rendered in DeepSeek-V3's chat template, with
a loss mask over the assistant's tokens; bad records set aside with a reason and counted.

Records: one JSON object per line (`*.jsonl`, `*.jsonl.gz`, `*.json`, `*.ndjson`) or one Parquet row, each holding
`messages`, a list of `{"role": "system" | "user" | "assistant", "content": str}`; an assistant message may carry
`reasoning_content` (a `<think>` trace). Files are read through `training.storage`, so a local path and an `s3://`
prefix read alike.

The template (DeepSeek-V3 §5.1 fine-tunes on conversations; the released template is the one TRL ships as
`trl/chat_templates/deepseekv3.jinja`, the tests' reference):

    <｜begin▁of▁sentence｜>{system prompts, joined by "\\n\\n"}
    <｜User｜>{user}   <｜Assistant｜>{assistant}<｜end▁of▁sentence｜>   ... per turn, in order

System messages are hoisted to the front wherever they stand, as the released template does. Rendering happens in
token space: each text piece is encoded on its own and the special tokens' ids go between, so the ids are exactly
those of encoding the rendered string (the tokenizer splits at its added tokens first) and a piece's text can never
fuse with a marker.

The loss mask is 1 on what the model must learn to write: each assistant turn's tokens and the end-of-sentence token
that closes it (so it learns to stop). System, user and `<｜Assistant｜>` marker tokens are 0; the marker is the
prompt that asks for a reply, not part of it. mask[i] says whether ids[i] is a target: with labels = ids[1:], the
label mask is mask[1:].
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer

from training import storage
from training import tokenizer as T

ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SAMPLE_CHARS = 200          # how much of a rejected record the rejects file keeps (as curate does)
REJECT_SAMPLES = 100        # rejected records kept per reason in the rejects file (counts cover them all)

# Why a record is set aside; the counts and the rejects file use these names.
MALFORMED_JSON, INVALID_UTF8, BLANK_LINE = "malformed_json", "invalid_utf8", "blank_line"
MISSING_MESSAGES, INVALID_MESSAGE, UNKNOWN_ROLE = "missing_messages", "invalid_message", "unknown_role"
MISSING_ASSISTANT, EMPTY_ASSISTANT = "missing_assistant", "empty_assistant"
SPECIAL_TOKEN_TEXT, TOO_LONG = "special_token_text", "too_long"
UNSUPPORTED_FILE, CORRUPT_FILE = "unsupported_file", "corrupt_file"


class BadRecord(ValueError):
    """A record that cannot become a training conversation; `reason` is one of the names above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class ChatDataError(RuntimeError):
    """A conversation dataset with too many bad records: it fails the stage, naming the file. Bad input: not
    retried."""

    permanent = True


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: str | None = None    # an assistant's `reasoning_content`


@dataclass(frozen=True)
class Conversation:
    id: str                 # "{file uri}:{line or row}"
    ids: list[int]
    loss_mask: list[int]    # 1 where ids[i] is an assistant token to learn


# ------------------------------------------------------------------------------------------------- messages --
def parse_messages(record: object) -> list[Message]:
    """A record's `messages`, checked; a `BadRecord` names the first thing wrong."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadRecord(MISSING_MESSAGES, "the record has no non-empty list field 'messages'")
    parsed = [_parse_message(k, m) for k, m in enumerate(messages)]
    turns = [m for m in parsed if m.role != "system"]
    if not any(m.role == "assistant" for m in turns):
        raise BadRecord(MISSING_ASSISTANT, "no assistant turn")
    if turns[-1].role != "assistant":   # a last user turn with no reply teaches nothing and costs tokens
        raise BadRecord(MISSING_ASSISTANT, "the last user turn has no assistant reply")
    return parsed


def _parse_message(k: int, message: object) -> Message:
    if not isinstance(message, dict):
        raise BadRecord(INVALID_MESSAGE, f"messages[{k}] is not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadRecord(UNKNOWN_ROLE, f"messages[{k}].role is {role!r}, not one of {ROLES}")
    if not isinstance(content, str):
        raise BadRecord(INVALID_MESSAGE, f"messages[{k}].content is {type(content).__name__}, not a string")
    if message.get("tool_calls"):   # the released template renders tool calls; this reader does not train on them
        raise BadRecord(INVALID_MESSAGE, f"messages[{k}] has tool_calls, which SFT data does not support")
    reasoning = message.get("reasoning_content")
    if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
        raise BadRecord(INVALID_MESSAGE, f"messages[{k}].reasoning_content must be a string on an assistant turn")
    if role == "assistant" and not content.strip():
        raise BadRecord(EMPTY_ASSISTANT, f"messages[{k}] is an assistant turn with empty content")
    return Message(role, content, reasoning or None)


# ------------------------------------------------------------------------------------------------- template --
class ChatTemplate:
    """DeepSeek-V3's chat template in token space for one tokenizer: DeepSeek's full BPE by default, or any
    `tokenizers.Tokenizer` with DeepSeek's special tokens at DeepSeek's ids (e.g. a vocabulary subset)."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer if tokenizer is not None else T.load_tokenizer()
        self.bos, self.eos = self._id(T.BOS), self._id(T.EOD)
        self.user, self.assistant = self._id(T.USER), self._id(T.ASSISTANT)
        self.think_begin, self.think_end = self._id(T.THINK_BEGIN), self._id(T.THINK_END)
        self.control_ids = frozenset(self.tokenizer.get_added_tokens_decoder())

    def _id(self, text: str) -> int:
        tid = self.tokenizer.token_to_id(text)
        if tid is None:
            raise ValueError(f"the tokenizer has no token {text!r}, which DeepSeek-V3's chat template needs")
        return tid

    def _text(self, text: str, where: str) -> list[int]:
        """A text piece's ids. Text spelling a control token (a literal end-of-sentence, `</think>` inside content)
        would encode as that token and forge the template's structure, so such a record is set aside."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        forged = self.control_ids.intersection(ids)
        if forged:
            names = sorted(self.tokenizer.id_to_token(i) for i in forged)
            raise BadRecord(SPECIAL_TOKEN_TEXT, f"{where} contains the special token text {', '.join(names)}")
        return ids

    def encode(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of one conversation."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")   # as the released template joins
        ids = [self.bos, *self._text(system, "the system prompt")]
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m.role == "user":
                prompt = [self.user, *self._text(m.content, f"messages[{k}].content")]
                ids += prompt
                mask += [0] * len(prompt)
            elif m.role == "assistant":
                reply = [*self._reply(m, k), self.eos]
                ids += [self.assistant, *reply]
                mask += [0] + [1] * len(reply)
        return ids, mask

    def prompt(self, messages: list[Message]) -> list[int]:
        """The ids a model continues to answer the conversation's last user turn: the conversation so far, then
        `<｜Assistant｜>` (generation, the task suite's evaluation, rollouts)."""
        if not messages or messages[-1].role != "user":
            raise ValueError("a prompt ends with a user turn")
        ids, _ = self.encode(messages)
        return [*ids, self.assistant]

    def _reply(self, m: Message, k: int) -> list[int]:
        """An assistant turn's tokens between `<｜Assistant｜>` and the closing end-of-sentence.

        A reasoning turn is `<think>\\n{reasoning}\\n</think>\\n\\n{content}`, DeepSeek-R1's form. The opener is
        fixed by R1-Distill's released template (TRL's `deepseek_r1_distill.jinja`), which prompts a reply with
        `<｜Assistant｜><think>\\n`; that template only cuts history at `</think>`, so the closer `\\n</think>\\n\\n`
        follows how R1's replies end their trace. TRL's `deepseek_r1_distill_training.jinja` renders a turn whose
        content holds this frame to these same ids. DeepSeek-V3's released template has no reasoning field: it keeps
        what follows `</think>` in an assistant turn, so the two differ by exactly the `<think>…</think>` tokens."""
        where = f"messages[{k}].content"
        if m.reasoning is None:
            return self._text(m.content, where)
        trace = self._text(f"\n{m.reasoning}\n", f"messages[{k}].reasoning_content")
        return [self.think_begin, *trace, self.think_end, *self._text(f"\n\n{m.content}", where)]


def encode_conversation(messages: list[dict], tokenizer: Tokenizer | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a list of message dicts; raises `BadRecord` when they cannot be trained on."""
    return ChatTemplate(tokenizer).encode(parse_messages({"messages": messages}))


# -------------------------------------------------------------------------------------------- bad-record tally --
@dataclass
class Tally:
    """Records read, kept and set aside (per reason), per file; and a sample of the rejects."""

    read: Counter = field(default_factory=Counter)                 # file uri -> records read
    dropped: dict[str, Counter] = field(default_factory=dict)      # file uri -> reason -> count
    samples: dict[str, list[dict]] = field(default_factory=dict)   # reason -> first REJECT_SAMPLES rejects
    tokens: int = 0                                                # tokens of the kept conversations
    target_tokens: int = 0                                         # of which under the loss mask

    def keep(self, uri: str, conversation: Conversation) -> None:
        self.read[uri] += 1
        self.tokens += len(conversation.ids)
        self.target_tokens += sum(conversation.loss_mask)

    def reject(self, uri: str, record_id: str, bad: BadRecord, sample: str | bytes) -> None:
        self.read[uri] += 1
        self.dropped.setdefault(uri, Counter())[bad.reason] += 1
        kept = self.samples.setdefault(bad.reason, [])
        if len(kept) < REJECT_SAMPLES:
            if isinstance(sample, bytes):   # a raw line: invalid bytes shown as \x.. escapes
                sample = sample[:SAMPLE_CHARS].decode("utf-8", "backslashreplace")
            kept.append({"id": record_id, "reason": bad.reason, "detail": bad.detail, "sample": sample[:SAMPLE_CHARS]})

    def reasons(self) -> dict[str, int]:
        """Rejected records per reason over all files."""
        return dict(sorted(sum(self.dropped.values(), Counter()).items()))

    def summary(self) -> dict:
        """Counts for a manifest or MLflow: `dropped` per reason as in curate's funnel."""
        rejected = sum(self.reasons().values())
        read = sum(self.read.values())
        return {"read": read, "conversations": read - rejected, "rejected": rejected, "dropped": self.reasons(),
                "tokens": self.tokens, "target_tokens": self.target_tokens,
                "files": {uri: {"read": n, "dropped": dict(self.dropped.get(uri, {}))}
                          for uri, n in sorted(self.read.items())}}

    def write_rejects(self, path: Path) -> Path:
        """The sampled rejects as JSONL, curate's record shape ({id, reason, sample}) plus the detail."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for reason in sorted(self.samples):
                for record in self.samples[reason]:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path

    def check(self, max_reject_ratio: float, rejects: Path | None = None) -> None:
        """Raise `ChatDataError` naming every file whose share of bad records exceeds `max_reject_ratio`."""
        over = [(uri, sum(self.dropped.get(uri, {}).values()), n) for uri, n in sorted(self.read.items())]
        over = [(uri, bad, n) for uri, bad, n in over if bad / n > max_reject_ratio]
        if over:
            lines = "; ".join(f"{uri}: {bad} of {n} records bad ({bad / n:.1%}: "
                              + ", ".join(f"{r} {c}" for r, c in sorted(self.dropped[uri].items())) + ")"
                              for uri, bad, n in over)
            see = f"; see {rejects}" if rejects else ""
            raise ChatDataError(f"conversation data over max_reject_ratio {max_reject_ratio:.1%}: {lines}{see}")


# ---------------------------------------------------------------------------------------------------- reading --
def read_conversations(uri: str, seq_length: int, tally: Tally, tokenizer: Tokenizer | None = None,
                       ) -> Iterator[Conversation]:
    """Every good conversation under `uri` (a file, directory or `s3://` prefix, files in URI order), as ids and loss
    mask; each bad record goes to `tally` with its reason instead, and reading goes on."""
    template = ChatTemplate(tokenizer)
    for file_uri, _size in storage.list_files(uri):
        for record_id, record, sample in _records(file_uri):
            try:
                if isinstance(record, BadRecord):
                    raise record
                ids, mask = template.encode(parse_messages(record))
                if len(ids) > seq_length:   # SFT never cuts a conversation: a cut reply would teach a wrong stop
                    raise BadRecord(TOO_LONG, f"{len(ids)} tokens > seq_length {seq_length}")
            except BadRecord as bad:
                tally.reject(file_uri, record_id, bad, sample)
                continue
            conversation = Conversation(record_id, ids, mask)
            tally.keep(file_uri, conversation)
            yield conversation


def load_conversations(uri: str, seq_length: int, rejects: Path, max_reject_ratio: float,
                       tokenizer: Tokenizer | None = None) -> tuple[list[Conversation], Tally]:
    """All good conversations under `uri` and their tally; writes the rejects file, then fails (naming the file) when
    a file's bad share exceeds `max_reject_ratio`."""
    tally = Tally()
    conversations = list(read_conversations(uri, seq_length, tally, tokenizer))
    tally.write_rejects(rejects)
    tally.check(max_reject_ratio, rejects)
    return conversations, tally


def _records(uri: str) -> Iterator[tuple[str, object, str | bytes]]:
    """(record id, parsed record or BadRecord, raw sample) of one file."""
    if uri.endswith(PARQUET_SUFFIXES):
        yield from _parquet_records(uri)
    elif uri.endswith(JSONL_SUFFIXES):
        yield from _jsonl_records(uri)
    else:
        yield uri, BadRecord(UNSUPPORTED_FILE, f"not one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}"), ""


def _jsonl_records(uri: str) -> Iterator[tuple[str, object, str | bytes]]:
    """Lines read as bytes and decoded one by one, so one bad line costs only itself."""
    path = storage.fetch(uri)
    opener = gzip.open if uri.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                yield f"{uri}:{number}", _json_line(raw), raw
    except (OSError, EOFError) as err:   # a truncated gzip stream: the lines read before it still count
        yield f"{uri}:{number + 1}", BadRecord(CORRUPT_FILE, f"{type(err).__name__}: {err}"), ""


def _json_line(raw: bytes) -> object:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(INVALID_UTF8, f"byte {err.start}: {err.reason}")
    if not line.strip():
        return BadRecord(BLANK_LINE, "an empty line")
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return BadRecord(MALFORMED_JSON, f"{err.msg} at character {err.pos}")


def _parquet_records(uri: str) -> Iterator[tuple[str, object, str | bytes]]:
    """One record per row of the `messages` column (a list of structs)."""
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(storage.fetch(uri))
        if "messages" not in parquet.schema_arrow.names:
            yield uri, BadRecord(MISSING_MESSAGES, f"no column 'messages' in {parquet.schema_arrow.names}"), ""
            return
        for batch in parquet.iter_batches(columns=["messages"], batch_size=1024):
            for messages in batch.column("messages").to_pylist():
                row += 1
                yield f"{uri}:{row}", {"messages": messages}, json.dumps(messages, ensure_ascii=False)
    except Exception as err:   # pyarrow raises ArrowInvalid/OSError on corrupt files
        yield f"{uri}:{row + 1}", BadRecord(CORRUPT_FILE, f"{type(err).__name__}: {err}"), ""
