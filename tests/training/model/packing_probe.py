"""Packed samples kept apart, through megatron-core's own schedule: `python packing_probe.py [ep=2] [pp=2]` (under
torchrun for 2 processes) runs each layout named in turn in the same processes (one process: no layout named) and
prints, per layout, one JSON line (with its "layout") from the rank holding the last pipeline stage.

The micro sft model (chat vocabulary, MLA, MoE, MTP), seeded layout-invariantly, scores one conversation A twice,
forward only: packed between two others (B, A, C in one sequence) and alone (A, then padding). With samples kept
apart, A's per-token losses (its logits at its labels) are the same in both. In one process the probe also compares
A's full logits, from the same model without MTP (GPTModel returns logits only when it computes no MTP loss).
"""
import json
import sys

import torch


def conversations(vocab):
    from training.data.chat import encode_conversation

    chats = [("Sort ascending: 9 1 4", "1 4 9"), ("Add: 12 + 30", "42"), ("Reverse: a b c d", "d c b a")]
    return [encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                vocab.tokenizer) for q, a in chats]


def batches(vocab, seq: int):
    """(packed batch, alone batch, A's slice in the packed one, A's slice alone), ids mapped to rows."""
    from training import tokenizer as T
    from training.data.sft_data import PackedSamples

    b, a, c = conversations(vocab)
    pad = T.token_id(T.PAD)
    packed = next(p for p in (PackedSamples([b, a, c], seq, pad, seed=s) for s in range(20))
                  if p.bins[0].index(1) > 0)   # a packing seed that puts A after another sample
    alone = PackedSamples([a], seq, pad, seed=0)
    order = packed.bins[0]
    assert len(packed) == 1 and len(order) == 3, packed.bins
    start = sum(len([b, a, c][i][0]) - 1 for i in order[:order.index(1)])
    n = len(a[0]) - 1

    def tensors(dataset):
        return vocab.batch_to_rows({k: torch.as_tensor(v).unsqueeze(0) for k, v in dataset[0].items()})
    return tensors(packed), tensors(alone), slice(start, start + n), slice(0, n)


def main():
    from megatron.core import parallel_state

    from training.parallel.setup import shutdown

    for layout in sys.argv[1:] or [""]:   # each layout in turn on the same processes (one launch)
        run(layout)
        parallel_state.destroy_model_parallel()
    shutdown()


def run(layout: str):
    from training.config import resolve_stage_config
    from training.parallel.setup import init_distributed

    args = dict(a.split("=") for a in layout.split(",") if a)
    cfg = resolve_stage_config("sft", "micro", overrides=[
        f"parallel.expert_model_parallel_size={args.get('ep', 1)}",
        f"parallel.pipeline_model_parallel_size={args.get('pp', 1)}", "parallel.use_distributed_optimizer=false",
        "model.num_layers=4"])   # two stages of two layers under PP2
    info = init_distributed(cfg.parallel, seed=7)
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from training.model.build import build_gpt
    from training.train.losses import PackedNextTokenLoss
    from training.vocabulary import vocabulary

    vocab = vocabulary(cfg.model.vocab_merges)
    packed, alone, in_packed, in_alone = batches(vocab, cfg.train.seq_length)
    gpt, _ = build_gpt(cfg.model, cfg.parallel, seed=11)
    gpt.eval()

    def per_token_losses(batch):
        def forward_step(iterator, model):
            output, _ = PackedNextTokenLoss()(model, next(iterator))
            return output, lambda out: (out.sum(), torch.tensor(1), {"per_token": out.detach()})

        with torch.no_grad():
            got = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                              model=[gpt], num_microbatches=1, seq_length=cfg.train.seq_length,
                                              micro_batch_size=1, forward_only=True)
        return got[0]["per_token"][0] if got else None

    a_packed, a_alone = per_token_losses(packed), per_token_losses(alone)
    if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        report = {"layout": layout, "world": info.world_size, "tokens": in_alone.stop,
                  "max_loss_diff": (a_packed[in_packed] - a_alone[in_alone]).abs().max().item(),
                  "other_samples_differ": (a_packed[:in_packed.start] - a_alone[:in_packed.start]).abs().max().item()}
        if info.world_size == 1:   # full logits, from the same architecture without MTP
            plain, _ = build_gpt(cfg.model.model_copy(update={"mtp_num_layers": 0}), cfg.parallel, seed=11)
            plain.eval()
            from training.model.packing import packed_positions, sample_mask

            with torch.no_grad():
                logits = []
                for batch in (packed, alone):
                    with packed_positions(batch["position_ids"]):
                        logits.append(plain(batch["tokens"], batch["position_ids"],
                                            sample_mask(batch["position_ids"]))[0].float())
            report["max_logit_diff"] = (logits[0][in_packed] - logits[1][in_alone]).abs().max().item()
            # RoPE is relative, so the logits above barely depend on where a sample's positions start; check the
            # rotary tables themselves: inside packed_positions each token gets its own sample's position
            from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

            rotary = next(m for m in gpt.modules() if isinstance(m, MultiLatentAttention)).rotary_pos_emb
            seq = cfg.train.seq_length
            table = rotary(seq)
            with packed_positions(packed["position_ids"]):
                per_token = rotary(seq)
            expected = table[:, 0, 0, :][packed["position_ids"][0]]
            report["rotary_shape"] = list(per_token.shape)
            report["rotary_at_sample_positions"] = bool(torch.equal(per_token[:, 0, 0, :], expected))
            report["rotary_restarts"] = bool(torch.equal(per_token[in_packed.start, 0, 0], table[0, 0, 0]))
            report["logits"] = list(logits[0].shape)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
