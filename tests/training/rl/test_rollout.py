"""GRPO's rollout (training/rl/rollout.py) on a small random policy: the micro architecture (MLA, MoE, MTP) on the
240-merge vocabulary subset, so the chat template's special tokens have rows and ids differ from rows.

A random model almost never says end-of-sentence, so a forward hook on its output layer makes the policy stop with
probability P_EOS at every position (part of the policy: sampling, old_logp and the independent recomputation all
see it), which gives both closed and cut-off responses. Megatron-core under the CPU shim is process-global: the
model work runs once in a fresh process (this file as a script, `python test_rollout.py probe`), which prints one
JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
P_EOS, GROUP, NEW_TOKENS = 0.1, 4, 8
ITEMS = [("Add: 2 + 3", "varied"), ("Sort ascending: 3 1 2", "varied"), ("Reverse: a b", "flat")]
SYSTEM = "Answer briefly."


def _rewards():
    from training.rl import rewards as R

    # Parity of the completion's length where the reference says "varied", a constant 1 where it says "flat": the
    # flat group must get zero advantages. Format is scored and logged with weight 0.
    parity = R.each("parity", lambda c, ref: float(len(c) % 2) if ref == "varied" else 1.0)
    return [parity, R.each("format", lambda c, _: R.format_reward(c))], {"parity": 1.0, "format": 0.0}


def _probe() -> dict:
    import math

    import torch

    from training import tokenizer as T
    from training.config import ModelConfig, ParallelConfig
    from training.data.chat import ChatTemplate, Message
    from training.eval.generate import Generator
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed
    from training.rl import rollout as RO
    from training.rl.grpo_loss import group_advantages

    torch.set_num_threads(1)   # tiny matrices: threads only contend (4x faster on this suite's 2-core host)
    init_distributed(ParallelConfig(), seed=0)
    model = ModelConfig(name="micro", vocab_size=512, vocab_merges=240, max_position_embeddings=128,
                        init_method_std=0.2, moe_router_topk=4)
    gpt, _ = build_gpt(model, ParallelConfig(), seed=1)
    gen = Generator(gpt, model.max_position_embeddings, batch_size=5, vocab_merges=model.vocab_merges)
    eos_row = int(gen.vocabulary.to_rows(torch.tensor([T.eod_id()])))

    def likes_eos(module, args, out):   # the EOS logit set so that P(EOS) = P_EOS at temperature 1
        logits = out[0].clone()
        others = logits.clone()
        others[..., eos_row] = float("-inf")
        logits[..., eos_row] = others.logsumexp(-1) + math.log(P_EOS / (1 - P_EOS))
        return (logits, *out[1:])

    gpt.output_layer.register_forward_hook(likes_eos)
    rewards, weights = _rewards()
    kwargs = {"group_size": GROUP, "rewards": rewards, "weights": weights, "max_new_tokens": NEW_TOKENS,
              "temperature": 1.0, "system_prompt": SYSTEM}
    gpt.train()
    a = RO.collect(gen, ITEMS, seed=5, **kwargs)
    out: dict = {"training_after": gpt.training and all(m.training for m in gpt.modules()),
                 "grads": sum(p.grad is not None for p in gpt.parameters()),
                 "requires_grad": [name for name in ("tokens", "old_logp", "advantages", "rewards")
                                   if getattr(a, name).requires_grad]}
    b = RO.collect(gen, ITEMS, seed=5, **kwargs)
    c = RO.collect(gen, ITEMS, seed=6, **kwargs)

    def same(x, y):
        return (torch.equal(x.tokens, y.tokens) and torch.equal(x.response_mask, y.response_mask)
                and torch.equal(x.old_logp, y.old_logp) and torch.equal(x.rewards, y.rewards)
                and x.completions == y.completions and x.stop_reasons == y.stop_reasons)

    out["same_seed_equal"], out["other_seed_equal"] = same(a, b), same(a, c)

    # What the Generator itself gives for these prompts and this seed (it is deterministic per seed).
    template = ChatTemplate(gen.tok)
    prompts = [template.prompt([Message("system", SYSTEM), Message("user", p)]) for p, _ in ITEMS]
    gpt.eval()
    gens = gen.generate([prompts[k] for k in range(len(ITEMS)) for _ in range(GROUP)], NEW_TOKENS, temperature=1.0,
                        seed=5)
    out["samples"] = [{"prompt": prompts[a.prompt_index[i]], "prompt_length": a.prompt_lengths[i],
                       "generated": g.token_ids, "stop_reason": g.stop_reason, "text": g.text,
                       "row": a.tokens[i].tolist(), "mask": a.response_mask[i].nonzero().view(-1).tolist(),
                       "rollout_stop_reason": a.stop_reasons[i], "completion": a.completions[i],
                       "old_logp_off_mask": a.old_logp[i][~a.response_mask[i]].abs().max().item(),
                       "old_logp": a.old_logp[i][a.response_mask[i]].tolist()}
                      for i, g in enumerate(gens)]
    out["shapes"] = {name: list(getattr(a, name).shape) for name in
                     ("tokens", "response_mask", "old_logp", "rewards", "advantages")}
    out["eos"], out["pad"] = T.eod_id(), T.token_id(T.PAD)

    # old_logp against megatron's own forward of each sample alone: its logits, log_softmax, the label's entry.
    diffs, calls = [], []
    hook = gpt.output_layer.register_forward_hook(lambda m, args, o: calls.append(o[0].detach().clone()))
    for i in range(len(a)):
        n = a.prompt_lengths[i] + int(a.response_mask[i].sum())
        rows = gen.vocabulary.to_rows(a.tokens[i:i + 1, :n])
        with torch.no_grad():   # with MTP, GPTModel.forward needs labels; the main head's call comes last
            gpt(rows, torch.arange(n).unsqueeze(0), None, labels=torch.roll(rows, -1, dims=1))
        logp = torch.log_softmax(calls[-1][:-1, 0].double(), dim=-1).gather(1, rows[0, 1:, None]).view(-1)
        mask = a.response_mask[i, :n - 1]
        diffs.append((logp[mask] - a.old_logp[i, :n - 1][mask].double()).abs().max().item())
    hook.remove()
    out["logp_max_diff"] = max(diffs)

    out["rewards"], out["advantages"] = a.rewards.tolist(), a.advantages.tolist()
    out["expected_advantages"] = group_advantages(a.rewards).view(-1).tolist()
    out["scores"], out["stats"] = a.scores, a.stats

    batches = list(RO.to_batches(a, micro_batch_size=5))
    out["batches"] = [{k: list(v.shape) for k, v in batch.items()} for batch in batches]
    cat = {k: torch.cat([batch[k] for batch in batches]) for k in batches[0]}
    out["batch_checks"] = {
        "tokens": torch.equal(cat["tokens"], a.tokens[:, :-1]), "labels": torch.equal(cat["labels"], a.tokens[:, 1:]),
        "loss_mask": torch.equal(cat["loss_mask"], a.response_mask.float()),
        "old_logp": torch.equal(cat["old_logp"], a.old_logp),
        "advantages": torch.equal(cat["advantages"], a.advantages[:, None].expand_as(cat["loss_mask"])),
        "position_ids": torch.equal(cat["position_ids"][0], torch.arange(a.tokens.shape[1] - 1)),
        "dtypes": [str(cat[k].dtype) for k in ("tokens", "labels", "loss_mask", "position_ids", "old_logp")]}
    padded = next(RO.to_batches(a, micro_batch_size=2, seq_length=a.tokens.shape[1] + 3))
    out["padded"] = {k: list(v.shape) for k, v in padded.items()}
    out["padded_tail"] = [padded["loss_mask"][:, -4:].abs().sum().item(), padded["old_logp"][:, -4:].abs().sum().item(),
                          padded["labels"][:, -4:].unique().tolist()]

    # From eval mode, a reply prefix: the mode is kept, the prefix ends the prompt and starts each completion.
    d = RO.collect(gen, ITEMS[:1], group_size=2, rewards=rewards, weights=weights, max_new_tokens=2, seed=1,
                   reply_prefix="<think>\n")
    prefix = gen.encode("<think>\n")
    out["prefix"] = {"eval_kept": not gpt.training,
                     "prompt_ends": all(d.tokens[i, d.prompt_lengths[i] - len(prefix):d.prompt_lengths[i]].tolist()
                                        == prefix for i in range(len(d))),
                     "completions": [c.startswith("<think>\n") for c in d.completions]}
    return out


@pytest.fixture(scope="module")
def probe():
    # imported here, not at the top: this file also runs as the probe script
    from tests.support.processes import run_probe

    return run_probe(__file__)


def test_shapes_and_label_aligned_response_mask(probe):
    n = len(ITEMS) * GROUP
    t = probe["shapes"]["tokens"][1]
    assert probe["shapes"] == {"tokens": [n, t], "response_mask": [n, t - 1], "old_logp": [n, t - 1],
                               "rewards": [len(ITEMS), GROUP], "advantages": [n]}
    reasons = {s["stop_reason"] for s in probe["samples"]}
    assert reasons == {"eod", "max_new_tokens"}, reasons    # both kinds of response are exercised
    for s in probe["samples"]:
        p = s["prompt_length"]
        assert s["row"][:p] == s["prompt"] and s["rollout_stop_reason"] == s["stop_reason"]
        # the EOS that closed a response is a response token; a cut-off response has none and is covered in full
        response = s["generated"] + ([probe["eos"]] if s["stop_reason"] == "eod" else [])
        if s["stop_reason"] == "max_new_tokens":
            assert len(s["generated"]) == NEW_TOKENS
        assert s["row"][p:p + len(response)] == response
        assert all(tok == probe["pad"] for tok in s["row"][p + len(response):])      # right padding
        # mask[t] is label t = token t + 1: exactly the response tokens' label positions, never padding or prompt
        assert s["mask"] == list(range(p - 1, p - 1 + len(response)))
        assert s["completion"] == s["text"] and probe["eos"] not in s["generated"]
        assert s["old_logp_off_mask"] == 0.0
    assert max(len(s["generated"]) + 1 for s in probe["samples"] if s["stop_reason"] == "eod") <= t


def test_old_logp_matches_a_plain_forward_of_each_sample(probe):
    assert probe["logp_max_diff"] < 1e-5


def test_same_seed_same_rollout_other_seed_other_samples(probe):
    assert probe["same_seed_equal"]
    assert not probe["other_seed_equal"]


def test_group_advantages_and_flat_group(probe):
    rewards, advantages = probe["rewards"], probe["advantages"]
    assert rewards[2] == [1.0] * GROUP and advantages[2 * GROUP:] == [0.0] * GROUP   # the flat group: no signal
    assert advantages == pytest.approx(probe["expected_advantages"], abs=0)
    assert any(len(set(row)) > 1 for row in rewards[:2]), rewards                   # some group has a signal
    for g, row in enumerate(rewards[:2]):
        group = advantages[g * GROUP:(g + 1) * GROUP]
        assert abs(sum(group)) < 1e-5 and (all(a == 0 for a in group) == (len(set(row)) == 1))
    # the parity reward is the completion text's length parity
    parity = [float(len(s["completion"]) % 2) for s in probe["samples"][:2 * GROUP]]
    assert probe["scores"]["parity"][:2 * GROUP] == parity
    stats = probe["stats"]
    flat = sum(len(set(row)) == 1 for row in rewards) / len(rewards)
    assert stats["zero_advantage_groups"] == pytest.approx(flat)
    assert stats["reward/format"] == 0.0 and stats["reward/parity"] == pytest.approx(
        sum(probe["scores"]["parity"]) / len(probe["scores"]["parity"]))
    lengths = [len(s["mask"]) for s in probe["samples"]]
    assert stats["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    cut = sum(s["stop_reason"] == "max_new_tokens" for s in probe["samples"])
    assert stats["truncated_fraction"] == pytest.approx(cut / len(probe["samples"]))
    old_logp = [lp for s in probe["samples"] for lp in s["old_logp"]]
    assert stats["entropy"] == pytest.approx(-sum(old_logp) / len(old_logp), rel=1e-5) and stats["entropy"] > 0
    # where the rollout's time went (benchmarks/grpo.py reads these from MLflow)
    assert all(stats[f"seconds/{phase}"] > 0 for phase in ("generate", "old_logp", "rewards"))


def test_policy_back_in_train_mode_without_grad(probe):
    assert probe["training_after"]
    assert probe["grads"] == 0 and probe["requires_grad"] == []
    assert probe["prefix"]["eval_kept"]


def test_reply_prefix_ends_the_prompt_and_starts_the_completion(probe):
    assert probe["prefix"]["prompt_ends"] and all(probe["prefix"]["completions"])


def test_training_batches(probe):
    t = probe["shapes"]["tokens"][1]
    keys = ["tokens", "labels", "loss_mask", "position_ids", "old_logp", "advantages"]
    assert [list(b) for b in probe["batches"]] == [keys] * 3
    assert [b["tokens"] for b in probe["batches"]] == [[5, t - 1], [5, t - 1], [2, t - 1]]
    assert all(len(set(map(tuple, b.values()))) == 1 for b in probe["batches"])
    checks = probe["batch_checks"]
    assert all(checks[k] for k in ("tokens", "labels", "loss_mask", "old_logp", "advantages", "position_ids"))
    assert checks["dtypes"] == ["torch.int64", "torch.int64", "torch.float32", "torch.int64", "torch.float32"]
    assert all(shape == [2, t + 3] for shape in probe["padded"].values())
    assert probe["padded_tail"] == [0.0, 0.0, [probe["pad"]]]


if __name__ == "__main__" and sys.argv[1:] == ["probe"]:
    sys.path.insert(0, str(REPO))
    print(json.dumps(_probe()), flush=True)
