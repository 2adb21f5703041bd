"""Scoring of the FIM, passkey, arithmetic and perplexity suites on fixed inputs (no model needed)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from training import benchmarks_data as B
from training import tokenizer as T
from training.eval import arith, fim, heldout, passkey, perplexity
from training.eval.generate import cut_at_stop


def encode(text: str) -> list[int]:
    return T.load_tokenizer().encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------------------- FIM --
def test_fim_prompt_is_psm_with_deepseek_tokens_token_by_token():
    item = fim.FimItem("x.py:2", prefix="def f(a):\n", middle="    b = a + 1", suffix="\n    return b\n")
    ids = fim.prompt_ids(item, encode, max_prefix_tokens=100, max_suffix_tokens=100)
    begin, hole, end = (T.token_id(t) for t in (T.FIM_BEGIN, T.FIM_HOLE, T.FIM_END))
    prefix, suffix = encode(item.prefix), encode(item.suffix)
    assert ids == [begin, *prefix, hole, *suffix, end]
    tok = T.load_tokenizer()
    assert tok.id_to_token(ids[0]) == "<\uff5cfim\u2581begin\uff5c>"
    assert tok.id_to_token(ids[1 + len(prefix)]) == "<\uff5cfim\u2581hole\uff5c>"
    assert tok.id_to_token(ids[-1]) == "<\uff5cfim\u2581end\uff5c>"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<\uff5cfim\u2581begin\uff5c>def f(a):\n<\uff5cfim\u2581hole\uff5c>\n    return b\n<\uff5cfim\u2581end\uff5c>")


def test_fim_prompt_trims_the_far_ends_of_prefix_and_suffix():
    item = fim.FimItem("x", prefix="a = 1\nb = 2\nc = 3\n", middle="d = 4", suffix="\ne = 5\nf = 6\n")
    ids = fim.prompt_ids(item, encode, max_prefix_tokens=3, max_suffix_tokens=2)
    assert ids[1:4] == encode(item.prefix)[-3:]            # nearest the hole survive
    assert ids[5:7] == encode(item.suffix)[:2]
    assert len(ids) == 3 + 3 + 2


def test_fim_items_are_deterministic_held_out_and_reassemble_the_file():
    first, again = fim.draw_items(5, seed=7), fim.draw_items(5, seed=7)
    assert first == again and len(first) == 5
    assert fim.draw_items(5, seed=8) != first
    for item in first:
        path, line = item.id.rsplit(":", 1)
        assert "site-packages" not in path and not path.startswith("test/")
        source = (heldout.stdlib_root() / path).read_text()
        assert item.prefix + item.middle + item.suffix in source
        assert source.splitlines()[int(line) - 1] == item.middle
        assert item.middle.strip() and not item.middle.strip().startswith("#")


def test_fim_exact_match_takes_the_first_line_and_ignores_surrounding_whitespace():
    assert fim.exact_match("    b = a + 1\n    return b", "    b = a + 1")
    assert fim.exact_match("b = a + 1  ", "    b = a + 1")
    assert not fim.exact_match("b = a + 2", "    b = a + 1")
    assert not fim.exact_match("\nb = a + 1", "b = a + 1")
    items = [fim.FimItem("1", "", "x = 1", ""), fim.FimItem("2", "", "y = 2", "")]
    assert fim.score(["x = 1\n", "y = 3"], items) == {"exact_match": 0.5, "problems": 2.0}


# ----------------------------------------------------------------------------------------------------- passkey --
@pytest.mark.parametrize("length", [128, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_the_exact_length_and_the_needle_at_its_depth(length, depth):
    ids = B.passkey_prompt_ids(encode, length, depth, "48213")
    assert len(ids) == length
    text = T.load_tokenizer().decode(ids)
    assert text.startswith(B.PASSKEY_TASK) and text.endswith(B.PASSKEY_QUESTION)
    needle = text.index("The pass key is 48213.")
    filler_start = len(B.PASSKEY_TASK)
    filler_end = len(text) - len(B.PASSKEY_QUESTION) - len(B.PASSKEY_NEEDLE) + 10
    relative = (needle - filler_start) / max(filler_end - filler_start, 1)
    assert abs(relative - depth) < 0.2


def test_passkey_items_keys_and_scoring():
    items = B.draw_passkey_items(encode, [128, 256], [0.0, 1.0], trials=2, seed=3)
    assert len(items) == 8 and items == B.draw_passkey_items(encode, [128, 256], [0.0, 1.0], trials=2, seed=3)
    assert all(len(i.key) == 5 and i.key.isdigit() for i in items)
    assert len({i.key for i in items}) > 1
    outs = [f" {items[0].key}.", "no idea", *["" for _ in items[2:4]], *[i.key for i in items[4:]]]
    metrics = passkey.score(outs, items)
    assert metrics == {"accuracy": 5 / 8, "problems": 8.0, "accuracy_len128": 1 / 4, "accuracy_len256": 1.0}
    assert passkey.hit("The pass key is 12345", "12345") and not passkey.hit("1234 5", "12345")
    with pytest.raises(ValueError, match="too short"):
        B.passkey_prompt_ids(encode, 40, 0.5, "12345")


# ---------------------------------------------------------------------------------------------------- arithmetic --
@pytest.mark.parametrize("text,answer", [
    (" 82", 82), (" 82\nQ: What is", 82), (" -17", -17), (" 1,234", 1234), (" 12.0", 12), (" 12.5", None),
    (" The answer is 42.", 42), ("I think 3 then #### 56", 56), (" answer is: -4", -4), (" none", None), ("", None),
    ("\n\n 7", 7), (" x\n 9", None),
])
def test_arith_answer_extraction(text, answer):
    assert arith.extract_answer(text) == answer


def test_arith_items_are_seeded_and_exact():
    items = B.draw_arith_items(50, seed=1, max_operand=20, two_step_fraction=0.5)
    assert items == B.draw_arith_items(50, seed=1, max_operand=20, two_step_fraction=0.5)
    for it in items:
        expr = it.question.removeprefix("What is ").removesuffix("?")
        assert eval(expr) == it.answer   # the test may eval: it checks the generator's own arithmetic
    assert any("(" in it.question for it in items) and any("(" not in it.question for it in items)
    shots = B.draw_arith_items(2, seed=1, id_prefix="shot")
    prompt = B.arith_prompt(items[0], shots)
    assert prompt.endswith(f"Q: {items[0].question}\nA:") and prompt.count("Q: ") == 3
    assert arith.score([f" {items[0].answer}", "0"], items[:2])["accuracy"] == (0.5 if items[1].answer else 1.0)


def test_the_evaluation_draw_is_the_problems_then_separately_seeded_shots():
    settings = SimpleNamespace(num_problems=5, few_shot=2, max_operand=20, operations=("+", "*"), two_step_fraction=0.0)
    problems, shots = B.evaluation_arith_items(settings, seed=1)
    assert problems == B.draw_arith_items(5, 1, max_operand=20, operations=("+", "*"))
    assert shots == B.draw_arith_items(2, 1, max_operand=20, operations=("+", "*"), id_prefix="arith-shot")
    assert [s.id for s in shots] == ["arith-shot-0", "arith-shot-1"]


# ---------------------------------------------------------------------------------------------------- perplexity --
def test_perplexity_of_a_known_distribution():
    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.log(p).expand(4, 3)
    nll = perplexity.nll_from_logits(logits, torch.tensor([0, 1, 2, 0]))
    assert nll.tolist() == pytest.approx([math.log(2), math.log(4), math.log(4), math.log(2)])
    acc = perplexity.NllAccumulator()
    acc.add(nll)
    assert acc.perplexity == pytest.approx(2 ** 1.5)          # exp(mean(ln2, ln4, ln4, ln2)) = 2^(3/2)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    vocab = 1000
    windows = perplexity.windows([list(range(50)), list(range(30))], seq_length=16, eod_id=999)
    acc = perplexity.evaluate(lambda t: perplexity.nll_from_logits(torch.zeros(*t.shape[:1], t.shape[1] - 1, vocab),
                                                                   t[:, 1:]), windows, batch_size=3)
    assert acc.tokens == 50 + 30 + 2 - 1                      # every token after the first, once (EODs included)
    assert acc.perplexity == pytest.approx(vocab)


def test_windows_overlap_by_one_token_and_padding_does_not_count():
    assert perplexity.windows([list(range(10))], seq_length=4) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert perplexity.windows([list(range(100))], seq_length=4, max_tokens=8) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    # Token-weighted: a model scoring NLL = the target token's value; pads (id 0 here) must not count.
    acc = perplexity.evaluate(lambda t: t[:, 1:].double(), [[5, 1, 1, 1], [5, 3]], batch_size=2, pad_id=0)
    assert (acc.tokens, acc.mean_nll) == (4, pytest.approx((1 + 1 + 1 + 3) / 4))


def test_heldout_docstrings_and_code_are_deterministic():
    docs = heldout.docstrings(seed=1, max_documents=3)
    assert docs == heldout.docstrings(seed=1, max_documents=3) and len(docs) == 3
    assert all(len(text) >= 200 for _, text in docs)
    code = heldout.code_files(seed=1, max_documents=2)
    assert len(code) == 2 and all("site-packages" not in name for name, _ in code)
    assert heldout.source_id().startswith("python-3.")


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("abc\ndef\nclass", ["\nclass", "\n"]) == "abc"
    assert cut_at_stop("abc", ["\n"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"
