"""A vocabulary subset: DeepSeek's BPE cut to its first N merges, its ids mapped to a small model's embedding rows."""
import pytest
import torch

from training import tokenizer as T
from training.config import ModelConfig
from training.vocabulary import VocabularyError, check_data, manifest_entry, vocabulary

MERGES = 3824   # the tiny preset's: 256 byte symbols + 3824 merges + 16 special tokens = 4096 rows
TEXTS = ["def f(x):\n\treturn x ** 2  # trailing   \n", "ünïcødé, 中文, emoji 🚀, RTL שלום", "Hello, world!", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_subset_encodes_any_text_in_deepseek_ids_that_the_full_tokenizer_decodes(text):
    ids = T.load_tokenizer(MERGES).encode(text, add_special_tokens=False).ids
    assert set(ids) <= set(T.bpe_subset_ids(MERGES))
    assert T.load_tokenizer().decode(ids, skip_special_tokens=False) == text


def test_subset_keeps_the_special_tokens_ids_and_splits_what_its_merges_cannot_reach():
    full, subset = T.load_tokenizer(), T.load_tokenizer(MERGES)
    for text in T.SPECIAL_TOKENS:
        assert subset.encode(text, add_special_tokens=False).ids == [full.token_to_id(text)], text
    word = " internationalization"   # one token of the full vocabulary, several of the first 3824 merges
    assert len(full.encode(word, add_special_tokens=False).ids) < len(subset.encode(word, add_special_tokens=False).ids)
    assert T.bpe_subset_ids(0) == tuple(range(3, 259))   # the byte-level alphabet alone


def test_rows_are_dense_and_map_back_to_the_same_ids():
    vocab = vocabulary(MERGES)
    assert vocab.rows == 256 + MERGES + len(T.SPECIAL_TOKENS) == 4096
    ids = torch.tensor([T.load_tokenizer(MERGES).encode(t, add_special_tokens=False).ids + [T.eod_id()]
                        for t in ["same length text a", "same length text b"]])
    rows = vocab.to_rows(ids)
    assert rows.shape == ids.shape and int(rows.max()) < vocab.rows and int(rows.min()) >= 0
    assert torch.equal(vocab.to_ids(rows), ids)
    assert torch.equal(vocab.to_ids(torch.arange(vocab.rows)).sort().values, torch.tensor(sorted(vocab.id_of_row)))
    full = vocabulary(None)
    assert full.rows == T.VOCAB_SIZE_PADDED and full.to_rows(ids) is ids


def test_an_id_without_a_row_is_refused_naming_it():
    full_only = T.load_tokenizer().encode(" internationalization", add_special_tokens=False).ids[0]
    with pytest.raises(VocabularyError, match=f"token id {full_only} .*first {MERGES} BPE merges"):
        vocabulary(MERGES).to_rows(torch.tensor([5, full_only]))


def test_data_and_model_must_share_the_vocabulary():
    small = ModelConfig(vocab_size=4096, vocab_merges=MERGES)
    check_data(manifest_entry(MERGES), small)
    with pytest.raises(VocabularyError, match=r"model.vocab_merges \(3824\) differs from the curated data's \(None\)"):
        check_data(manifest_entry(None), small)
    with pytest.raises(VocabularyError, match=r"model.vocab_size \(4000\) is smaller than the tokenizer's \(4096\)"):
        check_data(manifest_entry(MERGES), ModelConfig(vocab_size=4000, vocab_merges=MERGES))
    with pytest.raises(VocabularyError, match="vocab_size"):
        vocabulary(MERGES).check_fits(4095)
