"""SFT packing: samples end to end, positions restarting per sample, the loss mask shifted with the labels."""
import numpy as np
import pytest

from training.data.sft_data import PackedSamples

PAD = 2


def test_samples_are_packed_first_fit_with_positions_restarting_and_padding_never_learned():
    conversations = [([10, 11, 12, 13], [0, 0, 1, 1]), ([20, 21, 22], [0, 1, 1]), ([30, 31, 32, 33, 34], [0, 0, 0, 1, 1])]
    packed = PackedSamples(conversations, seq_length=8, pad_id=PAD, seed=0)
    assert sum(len(members) for members in packed.bins) == 3 and packed.tokens == 3 + 2 + 4
    for members, sample in zip(packed.bins, packed.samples):
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        at = 0
        for index in members:
            ids, mask = conversations[index]
            n = len(ids) - 1
            assert tokens[at:at + n] == ids[:-1] and labels[at:at + n] == ids[1:]
            assert sample["loss_mask"][at:at + n].tolist() == mask[1:]            # shifted with the labels
            assert sample["position_ids"][at:at + n].tolist() == list(range(n))   # restart at every sample
            at += n
        assert set(tokens[at:]) <= {PAD} and not sample["loss_mask"][at:].any()   # padding: never learned
        assert all(len(v) == 8 for v in sample.values())
    assert packed.fill == pytest.approx(9 / (8 * len(packed)))


def test_packing_is_deterministic_per_seed():
    conversations = [(list(range(n + 2)), [0] * (n + 2)) for n in range(1, 12)]
    first = PackedSamples(conversations, 16, PAD, seed=1)
    assert first.bins == PackedSamples(conversations, 16, PAD, seed=1).bins
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, PackedSamples(conversations, 16, PAD,
                                                                                             seed=1)))


def test_a_conversation_longer_than_a_sequence_is_refused():
    with pytest.raises(ValueError, match="conversation 0 has 10 ids; a sample needs 2 to 9"):
        PackedSamples([(list(range(10)), [1] * 10)], seq_length=8, pad_id=PAD)
