"""Generation with megatron-core's KV cache (training/eval/kv_cache.py, training/eval/generate.py).

The megatron-side runs are in generate_cache_check.py, in fresh processes: the layout model decoded on its shards and
saved as a release under EP2 and PP2 (torchrun, 2 processes), then one process that decodes every model with and
without the cache, and the releases the layouts wrote."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.support.processes import REPO, ok, repo_env, run_python, torchrun
from training.eval.generate import Generator, nucleus, sample

CHECK = "tests/training/eval/generate_cache_check.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # small tensors: one thread is faster and steadier on a shared 2-core machine


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_cache")
    ok(subprocess.run([sys.executable, *torchrun(2), CHECK, "save",
                       *(arg for layout in ("EP2", "PP2") for arg in (layout, str(tmp / "releases" / layout)))],
                      cwd=REPO, capture_output=True, text=True, timeout=300,
                      env=repo_env(PYTHONWARNINGS="ignore", **ONE_THREAD)))
    ok(run_python(CHECK, "check", str(tmp / "report.json"), str(tmp / "releases" / "EP2"),
                  str(tmp / "releases" / "PP2"), env=ONE_THREAD))
    return json.loads((tmp / "report.json").read_text())


@pytest.mark.parametrize("model", ["mla_moe_mtp", "yarn", "vocab_subset"])
def test_greedy_with_the_cache_equals_greedy_without_it(report, model):
    """Token for token, for batches of prompts of different lengths; YaRN decodes well past its original context."""
    r = report[model]
    assert r["cached"] == r["uncached"]
    assert r["reasons"] == r["uncached_reasons"]
    assert all(len(t) == 24 for t in r["cached"]), r["reasons"]   # nothing cut short: every position compared


def test_ep2_and_pp2_decode_on_their_shards_and_save_what_one_process_decodes(report):
    """The same weights drawn under each layout (layout-invariant init by seed): decoded there on the shards, greedy
    and sampled (EP2: the ranks on different prompts, in lockstep; PP2: hidden states passed between the stages),
    and saved from there, then loaded into one process (cached == uncached): every way, the one-process tokens."""
    for layout in ("EP2", "PP2"):
        r = report[f"release_{layout}"]
        assert r["cached"] == r["uncached"] == report["layout_one_process"], layout
        assert r["decoded_under_the_layout"]["greedy"] == report["layout_one_process"], layout
        assert r["decoded_under_the_layout"]["sampled"] == report["layout_one_process_sampled"], layout


def test_a_prompt_decodes_alone_as_in_a_batch(report):
    r = report["mla_moe_mtp"]
    assert r["alone"] == r["cached"]


def test_stop_token_ids_end_a_row_without_the_token(report):
    stop = report["mla_moe_mtp"]["stop_token"]
    for key in ("cached", "uncached"):
        token_ids, reason, stop_id = stop[key][0]
        assert (token_ids, reason, stop_id) == (stop["expected"], "stop_token", stop["token"]), key
    assert stop["cached"] == stop["uncached"]   # the other rows go on (the cache drops the ended row) and agree


def test_a_stop_string_ends_a_row_at_the_token_completing_it_and_cuts_the_text(report):
    stop = report["vocab_subset"]["stop_string"]
    for key in ("cached", "uncached"):
        assert stop[key][1] == [stop["expected"], "stop_string", stop["text"]], key
        assert stop["stop"] not in stop[key][1][2]
    assert stop["cached"] == stop["uncached"]


def test_max_new_tokens_and_the_context_bound_are_respected(report):
    r = report["mla_moe_mtp"]
    assert r["zero"] == [[[], "", "max_new_tokens"]] * 5
    assert r["three"] == [t[:3] for t in r["cached"]]
    # a prompt 4 short of max_position_embeddings: 4 new tokens fill the context, with and without the cache
    assert r["context_full"][0] == r["context_full"][1]
    assert len(r["context_full"][0][0]) == 4 and r["context_full"][0][1] == "context_full"


def test_sampling_is_reproducible_per_seed_and_independent_of_batching_and_the_cache(report):
    s = report["mla_moe_mtp"]["sampled"]
    assert s["seed1"] == s["seed1_again"] == s["seed1_one_per_batch"] == s["seed1_uncached"]
    assert s["seed1"] != s["seed2"]
    assert s["seed1"] != [t[:8] for t in report["mla_moe_mtp"]["cached"]]   # temperature 1.5 is not greedy


# ---- sampling on fixed logits (no model) ----

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])   # by rank: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_reaching_p():
    kept = lambda p: (nucleus(PROBS[None], p)[0] > 0).nonzero().flatten().tolist()   # noqa: E731
    assert kept(0.1) == [1]            # the most likely token is always kept
    assert kept(0.7) == [1, 3]         # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [1, 2, 3]      # 0.8 < 0.9 <= 0.95
    assert kept(1.0) == [0, 1, 2, 3]
    assert torch.equal(nucleus(PROBS[None], 0.7)[0, [1, 3]], PROBS[[1, 3]])   # kept probabilities unchanged


def test_sampling_draws_from_the_renormalised_nucleus_only():
    logits = PROBS.log()[None].expand(4000, -1)
    uniforms = (torch.arange(4000) + 0.5) / 4000   # an even grid over [0, 1): frequencies are exact to 1/4000
    counts = torch.bincount(sample(logits, 1.0, 0.7, uniforms), minlength=4)
    assert counts.tolist() == [0, 2500, 0, 1500]   # 0.5 / 0.8 and 0.3 / 0.8
    full = torch.bincount(sample(logits, 1.0, 1.0, uniforms), minlength=4) / 4000
    assert torch.allclose(full, PROBS, atol=1e-3)
    hot = torch.bincount(sample(logits, 2.0, 1.0, uniforms), minlength=4) / 4000   # temperature 2: p^(1/2) normalised
    assert torch.allclose(hot, PROBS.sqrt() / PROBS.sqrt().sum(), atol=1e-3)
    assert sample(logits[:3], 0.0).tolist() == [1, 1, 1]   # temperature 0: greedy


def test_sampling_never_picks_a_token_of_probability_zero():
    """A vocabulary subset's padding rows have logit -inf: not even a draw of exactly 0 lands on one."""
    logits = torch.tensor([[-math.inf, 1.0, -math.inf, 2.0]])
    assert sample(logits, 1.0, 1.0, torch.tensor([0.0])).tolist() == [1]
    assert sample(logits, 1.0, 0.5, torch.tensor([0.0])).tolist() == [3]
    assert sample(logits, 1.0, 1.0, torch.tensor([1 - 1e-7])).tolist() == [3]


def test_generate_refuses_bad_settings_before_decoding():
    gen = Generator(torch.nn.Linear(1, 1), max_positions=16)   # no decoding happens: any module with parameters
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            gen.generate([[5, 6]], **{"max_new_tokens": 4, **bad})
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[]], 4)
    with pytest.raises(ValueError, match="no room"):
        gen.generate([list(range(16))], 4)
