"""Fixtures shared by the training tests that run the pretrain stage as a subprocess."""
from __future__ import annotations

import pytest

from tests.training.test_pretrain import VOCAB
from training.data.synthetic import write_synthetic_curate


@pytest.fixture(scope="module")
def curate_root(tmp_path_factory):
    """A curate stage's output (manifest and indexed dataset) over 200 patterned token streams, vocabulary 512."""
    root = tmp_path_factory.mktemp("curate")
    write_synthetic_curate(root, vocab_size=VOCAB, documents=200)
    return root
