"""Knowledge CPT with KSSM (code_cpt's `kssm`; training/train/kssm.py, training/model/salient_attention.py): the
attention objective against a direct transcription, and a real micro run from the chat parent on the generated
knowledge corpus: the same first loss as plain CPT (the objective changes the update, not the measurement), K-B
labels found, the attention term logged, and the recall probe scoring its release; layouts it cannot serve are
refused naming the field."""
from __future__ import annotations

import math

import pytest
import torch

from training.model.salient_attention import salient_attention_loss


def test_the_attention_objective_is_minus_log_the_mass_on_earlier_kb_tokens():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    kb = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    queries = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    terms = []
    for b in range(2):
        for i in range(5):
            if not queries[b, i] or not kb[b, :i + 1].any():
                continue   # no K-B token at or before this query: nothing to attend to
            mass = 0.0
            for h in range(3):
                scores = [float(q[b, h, i] @ k[b, h, j]) * 0.5 for j in range(i + 1)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                mass += sum(w for j, w in enumerate(weights) if kb[b, j]) / sum(weights) / 3
            terms.append(-math.log(mass + 1e-6))
    assert len(terms) == 3   # row 0's queries 1, 2 and 4; row 1 has no K-B token
    assert abs(float(salient_attention_loss(q, k, 0.5, kb, queries)) - sum(terms) / len(terms)) < 1e-5
    nothing = salient_attention_loss(q, k, 0.5, torch.zeros_like(kb), queries)
    assert float(nothing) == 0.0


@pytest.fixture(scope="module")
def knowledge_corpus(tmp_path_factory):
    from tests.support.sft import MERGES
    from training.data.knowledge_data import write_knowledge_curate

    root = tmp_path_factory.mktemp("knowledge")
    write_knowledge_curate(root, seed=1, people=20, vocab_merges=MERGES)
    return root


@pytest.mark.slow
def test_knowledge_cpt_with_kssm_trains_and_its_release_answers_the_recall_probe(knowledge_corpus, chat_parent,
                                                                              tmp_path):
    from tests.support.code_cpt import code_cpt
    from tests.support.layouts import losses
    from tests.support.sft import MERGES

    common = (f"model.vocab_merges={MERGES}", "model.num_layers=3", "fim_rate=null", "train.save_interval=4")
    runs = {}
    for name, extra in (("plain", ()), ("kssm", ("kssm.span_weight=1.0", "kssm.attention_weight=0.1",
                                                  "kssm.model_fraction=0.1"))):
        out = code_cpt(tmp_path / name, knowledge_corpus, chat_parent, *common, *extra, architecture=False)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs[name] = {m: losses(tmp_path / name, m) for m in ("lm_loss", "kssm_loss", "salient_share",
                                                              "salient_attention_loss", "salient_lm_loss")}
    plain, kssm = runs["plain"], runs["kssm"]
    assert plain["salient_share"] == {}                     # plain CPT: the next-token loss only
    assert kssm["lm_loss"][1] == plain["lm_loss"][1]        # same parent, same batch, before any update
    assert kssm["lm_loss"][4] != plain["lm_loss"][4]        # a different objective moved the weights differently
    assert all(0.05 < share < 0.9 for share in kssm["salient_share"].values()), kssm["salient_share"]
    assert all(a > 0 for a in kssm["salient_attention_loss"].values())
    assert sorted(kssm["salient_lm_loss"]) == sorted(kssm["kssm_loss"]) == [1, 2, 3, 4]

    import json

    from tests.support.processes import run_python

    out = run_python("-m", "training.eval.recall", str(tmp_path / "kssm" / "code_cpt" / "release"),
                     str(knowledge_corpus / "curate" / "knowledge_probes.jsonl"), "--limit", "8")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert scores["probes"] == 8 and 0 <= scores["exact_match"] <= 1 and scores["mean_gold_rank"] >= 1


def test_kssm_refuses_layouts_it_cannot_serve_naming_the_field():
    from training.config import resolve_stage_config
    from training.config.loader import ConfigError

    with pytest.raises(ConfigError, match="kssm: K-B spans are found on each sequence's text"):
        resolve_stage_config("code_cpt", "micro", overrides=["kssm.span_weight=1", "parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError, match="kssm.attention_weight: the attention objective"):
        resolve_stage_config("code_cpt", "micro", overrides=[
            "kssm.attention_weight=0.1", "parallel.pipeline_model_parallel_size=2", "model.num_layers=4"])
    with pytest.raises(ConfigError, match="kssm.attention_weight: each tensor-parallel rank holds only its heads"):
        resolve_stage_config("code_cpt", "micro", overrides=[
            "kssm.attention_weight=0.1", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])
    resolve_stage_config("code_cpt", "micro", overrides=[   # the span objective alone works under PP
        "kssm.attention_weight=0", "parallel.pipeline_model_parallel_size=2", "model.num_layers=4"])


@pytest.mark.slow
@pytest.mark.extended
def test_kssm_run_killed_mid_run_resumes_bit_for_bit(knowledge_corpus, chat_parent, tmp_path):
    """The loss keeps no state of its own (K-B marks come from the batch and the forward), so code_cpt's resume
    holds with `kssm` on: the resumed steps give the uninterrupted run's losses exactly."""
    import signal

    from tests.support.code_cpt import code_cpt, command
    from tests.support.layouts import losses
    from tests.support.processes import kill_after
    from tests.support.sft import MERGES

    sets = (f"model.vocab_merges={MERGES}", "model.num_layers=3", "fim_rate=null", "train.save_interval=2",
            "kssm.span_weight=1.0", "kssm.attention_weight=0.1", "kssm.model_fraction=0.1")
    whole = code_cpt(tmp_path / "whole", knowledge_corpus, chat_parent, *sets, architecture=False)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    cmd = command(tmp_path / "cut", knowledge_corpus, chat_parent, *sets, architecture=False)
    rc = kill_after(cmd, "code_cpt: saved iter_0000002", tmp_path / "killed.log")
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    resumed = code_cpt(tmp_path / "cut", knowledge_corpus, chat_parent, *sets, architecture=False)
    assert "resumed from step 2" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for metric in ("lm_loss", "kssm_loss", "salient_attention_loss"):
        after, uninterrupted = losses(tmp_path / "cut", metric), losses(tmp_path / "whole", metric)
        assert sorted(after) == [3, 4] and [after[3], after[4]] == [uninterrupted[3], uninterrupted[4]], metric
