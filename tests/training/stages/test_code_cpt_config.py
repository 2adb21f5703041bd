"""code_cpt without training: its presets against the paper, the mixture and FIM-rate checks on fixed manifests, and
the middle-token loss the FIM benchmark measures, on fixed tensors."""
from __future__ import annotations

import math

import pytest
import torch

from training.config import ConfigError, resolve_pipeline_config, resolve_stage_config


def test_the_coder_v2_lite_preset_counts_the_papers_parameters():
    """Coder-V2 Table 2: 16B total, 2.4B active. Measured: 15.71B and 2.451B (DeepSeek-V2-Lite's architecture, §3.2):
    the total rounds to the paper's whole billions; the active count, like V2-Lite's own 2.4B (V2 App. B), is the
    paper's truncated to one decimal (2.451 -> 2.4)."""
    from training.model.params import count_params

    for stage in ("pretrain", "code_cpt"):   # code_cpt continues the pretrain section's architecture
        counted = count_params(resolve_stage_config(stage, "deepseek-coder-v2-lite").model)
        assert round(counted.total / 1e9) == 16, counted.total
        assert math.floor(counted.activated / 1e8) / 10 == 2.4, counted.activated


def test_the_coder_v2_lite_preset_carries_the_papers_training_settings():
    cfg = resolve_stage_config("code_cpt", "deepseek-coder-v2-lite")
    opt, train = cfg.optimizer, cfg.train
    assert (opt.decay_style, opt.warmup_steps, opt.min_lr / opt.lr) == ("cosine", 2000, pytest.approx(0.1))   # §3.3
    assert (opt.adam_beta1, opt.adam_beta2, opt.weight_decay) == (0.9, 0.95, 0.1)                            # §3.3
    assert cfg.fim_rate == 0.5                                                                                 # §3.1
    assert cfg.mixture == {"code": 0.6, "math": 0.1, "text": 0.3}                                              # §2
    assert train.steps * train.global_batch_size * train.seq_length == pytest.approx(6e12, rel=1e-5)          # +6T


def test_the_tiny_profile_chains_curate_code_into_code_cpt_consistently():
    pipeline = resolve_pipeline_config("tiny")
    code_cpt, curate_code = pipeline.code_cpt, pipeline.stage("curate_code")
    assert code_cpt.upstream("curate") == "curate_code" and code_cpt.upstream("pretrain") == "pretrain"
    assert code_cpt.model == pipeline.pretrain.model   # the parent's architecture
    sources = {s.label: s for s in curate_code.sources}
    assert set(code_cpt.mixture) == set(sources)
    assert all(s.fim.rate == code_cpt.fim_rate for s in sources.values() if s.is_code)
    # One architecture: overriding the pretrain model in the pipeline moves code_cpt's too (a YAML alias).
    moved = resolve_pipeline_config("tiny", {"pretrain.model.num_layers": 4})
    assert moved.code_cpt.model.num_layers == 4


def test_fim_rates_outside_zero_one_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"code_cpt.fim_rate: Input should be less than or equal to 1"):
        resolve_pipeline_config("tiny", {"code_cpt.fim_rate": 1.5})
    with pytest.raises(ConfigError, match=r"fim_rate: Input should be greater than or equal to 0"):
        resolve_stage_config("code_cpt", "tiny", overrides=["fim_rate=-0.1"])
    sources = [{"kind": "package_metadata"}, {"kind": "package_code", "fim": {"rate": 1.5}}]
    with pytest.raises(ConfigError, match=r"curate_code.sources.1.fim.rate: Input should be less than or equal to 1"):
        resolve_pipeline_config("tiny", {"curate_code.sources": sources})
    with pytest.raises(ConfigError, match=r"code_cpt.mixture.package_code: Input should be greater than 0"):
        resolve_pipeline_config("tiny", {"code_cpt.mixture": {"package_code": 0}})


def _manifest(code_rate: float) -> dict:
    fim = {"rate": code_rate, "spm_rate": 0.0, "seed": 0, "documents": {"psm": 5, "spm": 0, "none": 5}}
    return {"outputs": {"tokenizer": {"vocab_size": 129280, "eod_id": 1}, "datasets": [
        {"name": "package_metadata", "kind": "package_metadata", "prefix": "/d/text", "weight": 1.0},
        {"name": "package_code", "kind": "package_code", "prefix": "/d/code", "weight": 1.0, "fim": fim},
        {"name": "more_text", "kind": "text", "prefix": "/d/more", "weight": 2.0}]}}


def test_the_mixture_reweights_and_selects_the_curated_sources():
    from training.stages.code_cpt import mixed

    cfg = resolve_stage_config("code_cpt", "tiny")   # mixture {package_code: 0.6, package_metadata: 0.3}
    chosen = mixed(cfg, _manifest(0.5))["outputs"]["datasets"]
    assert [(d["name"], d["weight"]) for d in chosen] == [("package_code", 0.6), ("package_metadata", 0.3)]
    assert chosen[0]["prefix"] == "/d/code"   # what megatron's BlendedMegatronDatasetBuilder then blends
    everything = mixed(cfg.model_copy(update={"mixture": None}), _manifest(0.5))["outputs"]["datasets"]
    assert [d["weight"] for d in everything] == [1.0, 1.0, 2.0]   # default: the manifest's own weights


@pytest.mark.parametrize("update, manifest_rate, message", [
    ({"mixture": {"package_code": 0.6, "math": 0.1}}, 0.5, r"mixture.math: the curate manifest has no such source"),
    ({}, 0.0, r"fim_rate: 0.5, but the code source 'package_code' was curated with fim.rate 0.0"),
    ({"mixture": {"package_metadata": 1.0}}, 0.5, r"fim_rate: 0.5, but the mixture has no code source"),
])
def test_a_mixture_that_does_not_fit_the_corpus_is_refused(update, manifest_rate, message):
    from training.stages.code_cpt import CodeCptError, mixed

    cfg = resolve_stage_config("code_cpt", "tiny").model_copy(update=update)
    with pytest.raises(CodeCptError, match=message):
        mixed(cfg, _manifest(manifest_rate))
    assert CodeCptError.permanent   # bad input: not retried


def test_fim_rate_null_or_zero_accepts_any_corpus():
    from training.stages.code_cpt import mixed

    cfg = resolve_stage_config("code_cpt", "tiny")
    assert mixed(cfg.model_copy(update={"fim_rate": None}), _manifest(0.0))
    assert mixed(cfg.model_copy(update={"fim_rate": 0.0, "mixture": {"more_text": 1.0}}), _manifest(0.5))


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_the_middle_token_loss_reads_exactly_the_middles_next_token_losses(mode):
    from training import tokenizer as T
    from training.train.losses import fim_middle_span, middle_token_nll

    prefix, middle, suffix = [101, 102], [201, 202, 203], [301]
    ids = T.fim_document_ids(prefix, middle, suffix, mode)
    start, end = fim_middle_span(len(prefix), len(middle), len(suffix))
    assert ids[start:end] == middle and ids[end] == T.eod_id()
    # Row 0 is the document; row 1 a shorter one (an empty prefix, a one-token middle) right-padded in the batch.
    short = T.fim_document_ids([], [401], [501, 502], mode)
    short_span = fim_middle_span(0, 1, 2)
    assert short[short_span[0]:short_span[1]] == [401]
    nll = torch.arange(2 * (len(ids) - 1), dtype=torch.float64).view(2, -1)   # column t: NLL of token t + 1
    total, count = middle_token_nll(nll, [(start, end), short_span])
    expected = [nll[0, t - 1].item() for t in range(start, end)] + [nll[1, short_span[0] - 1].item()]
    assert (total, count) == (sum(expected), 4)
    assert middle_token_nll(nll, [(start, start), short_span])[1] == 1   # an empty middle counts nothing
    with pytest.raises(ValueError, match="outside tokens"):
        middle_token_nll(nll, [(start, len(ids) + 1), short_span])
