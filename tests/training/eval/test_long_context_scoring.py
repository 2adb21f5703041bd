"""Long-context scoring on fixed inputs (no model): the needle-in-a-haystack grid and heatmap, and perplexity by
position bucket, through the suites with a fake generator."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from training import benchmarks_data as B
from training.config import ConfigError, resolve_stage_config
from training.eval import niah, perplexity, suites
from training.eval.generate import Generation


def _item(length: int, depth: float, trial: int = 0) -> B.PasskeyItem:
    return B.PasskeyItem(f"len{length}-depth{depth:g}-{trial}", length, depth, "12345", ())


# --------------------------------------------------------------------------------------------------- NIAH grid --
def test_grid_counts_hits_per_length_and_depth_cell():
    items = [_item(n, d, t) for n in (256, 128) for d in (1.0, 0.0, 0.5) for t in range(2)]
    hits = [True, True, False, True, False, False,     # 256: depth 1 -> 2/2, depth 0 -> 1/2, depth 0.5 -> 0/2
            True, False, True, True, True, True]       # 128: 1/2, 2/2, 2/2
    cells = niah.grid(hits, items)
    assert [(c.context_length, c.depth, c.trials, c.hits) for c in cells] == [
        (128, 0.0, 2, 2), (128, 0.5, 2, 2), (128, 1.0, 2, 1), (256, 0.0, 2, 1), (256, 0.5, 2, 0), (256, 1.0, 2, 2)]
    assert niah.depth_metrics(cells) == {"accuracy_depth0": 0.75, "accuracy_depth0.5": 0.5, "accuracy_depth1": 0.75}
    table = niah.table(cells)
    assert table["accuracy"] == [1.0, 1.0, 0.5, 0.5, 0.0, 1.0] and table["context_length"][:3] == [128] * 3
    lengths, depths, values = niah.matrix(cells)
    assert (lengths, depths) == ([128, 256], [0.0, 0.5, 1.0])
    assert values == [[1.0, 0.5], [1.0, 0.0], [0.5, 1.0]]          # rows: depth (y), columns: length (x)
    with pytest.raises(ValueError):
        niah.grid([True], items)


def test_a_cell_not_run_is_blank_and_the_heatmap_is_a_png():
    cells = niah.grid([True, False, True], [_item(64, 0.0), _item(64, 1.0), _item(4096, 0.0)])
    assert math.isnan(niah.matrix(cells)[2][1][1])                  # (depth 1, length 4096) was not run
    png = niah.heatmap_png(cells)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    width, height = Image.open(io.BytesIO(png)).size
    assert width > 200 and height > 150
    assert niah._length_label(4096) == "4K" and niah._length_label(100) == "100"


class FakeGenerator:
    """One token per character (id = code point + 2, so it decodes back). Answers the passkey when the needle lies in
    the first half of the prompt; scores NLL = prediction position / 100, so every bucket's mean is known."""

    max_positions, pad_id, eod_id = 10_000, 0, 1

    def encode(self, text: str) -> list[int]:
        return [ord(ch) + 2 for ch in text]

    def generate(self, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0):
        out = []
        for ids in prompts:
            text = "".join(chr(i - 2) for i in ids)
            at = text.index("The pass key is ") + len("The pass key is ")
            out.append(Generation(text[at:at + 5] if at < len(text) / 2 else "no idea", [], "max_new_tokens"))
        return out

    def token_nll(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1] - 1, dtype=torch.float64)
        return (positions / 100).expand(tokens.shape[0], -1).clone()


def test_passkey_suite_returns_the_grid_table_and_heatmap():
    cfg = resolve_stage_config("evaluate", "tiny", overrides=[
        "passkey.context_lengths=[512,1024]", "passkey.depths=[0.0,0.25,1.0]", "passkey.trials=2"])
    result = suites.run_passkey(cfg, FakeGenerator())
    m = result.metrics
    assert m["problems"] == 12 and m["accuracy_depth0"] == 1.0 and m["accuracy_depth1"] == 0.0
    assert m["accuracy"] == pytest.approx(8 / 12) and {"accuracy_len512", "accuracy_len1024"} <= m.keys()
    grid = result.tables["niah/grid.json"]
    assert len(grid["accuracy"]) == 6 and sum(grid["trials"]) == 12
    assert sum(grid["hits"]) == sum(i["correct"] for i in result.items) == 8
    assert result.files["niah/heatmap.png"].startswith(b"\x89PNG")


# -------------------------------------------------------------------------------------------- position buckets --
def test_bucket_edges():
    assert perplexity.bucket_edges(256, "quarters") == [0, 64, 128, 256]
    assert perplexity.bucket_edges(256, [0, 64]) == [0, 64, 256]
    assert perplexity.bucket_edges(256, [0, 64, 256]) == [0, 64, 256]
    for bad in ([64, 128], [0, 128, 64], [0, 64, 64], [0, 300], []):
        with pytest.raises(ValueError, match="rise strictly"):
            perplexity.bucket_edges(256, bad)


def test_buckets_are_token_weighted_and_skip_padding():
    # NLL = the prediction position; windows of 8 predictions and one of 3 (a short last window, padded).
    windows = [list(range(9)), list(range(9)), list(range(4))]
    positions = perplexity.PositionBuckets([0, 2, 4, 8])
    acc = perplexity.evaluate(lambda t: torch.arange(t.shape[1] - 1, dtype=torch.float64).expand(len(t), -1),
                              windows, batch_size=2, pad_id=0, positions=positions)
    named = positions.named()
    assert [a.tokens for a in named.values()] == [6, 5, 8]                 # the short window's 3: 2 + 1 + 0
    assert named["pos_0_2"].mean_nll == pytest.approx(0.5)
    assert named["pos_2_4"].mean_nll == pytest.approx((2 + 3 + 2 + 3 + 2) / 5)
    assert named["pos_4_8"].mean_nll == pytest.approx(5.5)
    assert sum(a.nll_sum for a in named.values()) == pytest.approx(acc.nll_sum)
    assert sum(a.tokens for a in named.values()) == acc.tokens == 19
    metrics = positions.metrics("src_")
    assert metrics["src_pos_4_8"] == pytest.approx(math.exp(5.5)) and metrics["src_pos_4_8_tokens"] == 8.0

    empty = perplexity.PositionBuckets([0, 4, 16])     # windows never reach position 4
    perplexity.evaluate(lambda t: torch.zeros(len(t), t.shape[1] - 1, dtype=torch.float64), [[1, 2, 3]],
                        positions=empty)
    assert math.isnan(empty.metrics()["pos_4_16"]) and empty.metrics()["pos_4_16_tokens"] == 0.0


def test_pooled_buckets_merge_sums_not_means():
    a, b = perplexity.PositionBuckets([0, 2, 4]), perplexity.PositionBuckets([0, 2, 4])
    a.add(torch.ones(3, 4, dtype=torch.float64))             # 6 tokens of NLL 1 per bucket
    b.add(torch.full((1, 2), 4.0, dtype=torch.float64))     # 2 tokens of NLL 4 in the first bucket only
    a.merge(b)
    assert a.named()["pos_0_2"].mean_nll == pytest.approx((6 + 8) / 8)
    assert a.named()["pos_2_4"].mean_nll == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(perplexity.PositionBuckets([0, 4]))


def test_perplexity_suite_by_position_metrics_and_table(monkeypatch):
    docs = {"stdlib_docstrings": [("a", "x" * 300)], "stdlib_code": [("b", "y" * 100), ("c", "z" * 100)]}
    monkeypatch.setattr(suites.heldout, "docstrings", lambda seed, n: docs["stdlib_docstrings"])
    monkeypatch.setattr(suites.heldout, "code_files", lambda seed, n: docs["stdlib_code"])
    cfg = resolve_stage_config("evaluate", "tiny", overrides=[
        "perplexity.seq_length=64", "perplexity.position_buckets=[0,16,64]", "perplexity.max_tokens=1000"])
    gen = FakeGenerator()
    result = suites.run_perplexity(cfg, gen)
    m = result.metrics
    # One token per character plus an end-of-sentence token per document, windows of 64 predictions: docstrings
    # 301 tokens -> 4 full windows + one of 44 predictions; code 2 x 101 -> 3 full + one of 9.
    assert m["stdlib_docstrings_pos_0_16_tokens"] == 5 * 16 and m["stdlib_docstrings_pos_16_64_tokens"] == 4 * 48 + 28
    assert m["stdlib_code_pos_0_16_tokens"] == 3 * 16 + 9 and m["stdlib_code_pos_16_64_tokens"] == 3 * 48
    assert m["pos_0_16_tokens"] == 80 + 57 and m["pos_16_64_tokens"] == 220 + 144
    assert m["pos_0_16_nll"] == pytest.approx((8 * sum(range(16)) + sum(range(9))) / 137 / 100)
    assert m["pos_16_64"] == pytest.approx(math.exp(m["pos_16_64_nll"])) and m["pos_16_64"] > m["pos_0_16"]
    table = result.tables["perplexity/positions.json"]
    assert table["source"] == ["stdlib_docstrings"] * 2 + ["stdlib_code"] * 2 + ["all"] * 2
    assert table["start"] == [0, 16] * 3 and table["end"] == [16, 64] * 3
    assert table["tokens"][-2:] == [137, 364]
    # Off by default: the suite's metrics are the ones it always had.
    plain = suites.run_perplexity(resolve_stage_config("evaluate", "tiny", overrides=[
        "perplexity.seq_length=64"]), gen)
    assert not [k for k in plain.metrics if "pos_" in k] and not plain.tables


# ------------------------------------------------------------------------------------------------------ config --
def test_config_fields_validate_and_presets_still_do():
    for preset in ("tiny", "deepseek-v3", "deepseek-v2"):
        cfg = resolve_stage_config("evaluate", preset)
        assert cfg.perplexity.position_buckets is None and cfg.passkey.depths
    cfg = resolve_stage_config("evaluate", "tiny", overrides=["perplexity.seq_length=256",
                                                              "perplexity.position_buckets=quarters"])
    assert cfg.perplexity.position_buckets == "quarters"
    for bad in ("[16,64]", "[0,64,32]", "[0,300]"):
        with pytest.raises(ConfigError, match="position_buckets"):
            resolve_stage_config("evaluate", "tiny", overrides=["perplexity.seq_length=256",
                                                                f"perplexity.position_buckets={bad}"])


def test_windows_beyond_max_positions_only_when_allowed():
    model = SimpleNamespace(max_position_embeddings=64)
    only_ppl = ["humaneval.enabled=false", "fim.enabled=false", "passkey.enabled=false", "arith.enabled=false",
                "perplexity.seq_length=256"]
    cfg = resolve_stage_config("evaluate", "tiny", overrides=only_ppl)
    assert suites.context_problems(cfg, model) == [("perplexity.seq_length 256 exceeds max_position_embeddings 64 "
                                                    "(set perplexity.allow_beyond_max_positions to score beyond it)")]
    assert suites.context_problems(cfg, SimpleNamespace(max_position_embeddings=256)) == []   # 256 predictions
    cfg = resolve_stage_config("evaluate", "tiny", overrides=[*only_ppl, "perplexity.allow_beyond_max_positions=true"])
    assert suites.context_problems(cfg, model) == []
