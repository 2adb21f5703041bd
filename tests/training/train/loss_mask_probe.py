"""SFT's loss mask through the real model and loss, one process: `python loss_mask_probe.py` prints one JSON line.

Two chat conversations are rendered (DeepSeek-V3's template, the micro sft vocabulary), packed into one sequence and
put through the SFT loss (PackedNextTokenLoss) on a micro GPT model. Then every label the mask excludes (system,
user, <｜Assistant｜>
positions, padding) is replaced by another token and the step is run again: if prompt positions contribute nothing,
the loss and every parameter's gradient come out bit for bit the same. Changing one learned label (the closing
end-of-sentence) must change them.
"""
import json

import torch


def main():
    from training import tokenizer as T
    from training.config import resolve_stage_config
    from training.data.chat import encode_conversation
    from training.data.sft_data import PackedSamples
    from training.parallel.setup import init_distributed
    from training.train.losses import PackedNextTokenLoss
    from training.vocabulary import vocabulary

    cfg = resolve_stage_config("sft", "micro")
    init_distributed(cfg.parallel, seed=3)
    from training.model.build import build_gpt

    vocab = vocabulary(cfg.model.vocab_merges)
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort ascending: 3 1 2"},
              {"role": "assistant", "content": "1 2 3"}],
             [{"role": "user", "content": "Add: 2 + 2"}, {"role": "assistant", "content": "4"}]]
    packed = PackedSamples([encode_conversation(c, vocab.tokenizer) for c in chats], cfg.train.seq_length,
                           pad_id=T.token_id(T.PAD))
    sample = {k: torch.as_tensor(v).unsqueeze(0) for k, v in packed[0].items()}
    gpt, _ = build_gpt(cfg.model, cfg.parallel, seed=5)
    gpt.train()

    def step(batch):
        gpt.zero_grad()
        output, loss_func = PackedNextTokenLoss()(gpt, vocab.batch_to_rows(batch))
        total, count, _ = loss_func(output)
        (total / count).backward()
        return total.item(), torch.cat([p.grad.reshape(-1) for p in gpt.parameters() if p.grad is not None])

    loss, grads = step(sample)
    masked = sample["loss_mask"][0] == 0
    other = dict(sample, labels=torch.where(masked, torch.full_like(sample["labels"], T.token_id(T.BOS)),
                                            sample["labels"]))
    loss_prompt_changed, grads_prompt_changed = step(other)
    eod_positions = [i for i, (label, m) in enumerate(zip(sample["labels"][0].tolist(), sample["loss_mask"][0]))
                     if label == T.eod_id() and m == 1]
    learned = sample["labels"].clone()
    learned[0, eod_positions[0]] = T.token_id(T.BOS)
    loss_eod_changed, grads_eod_changed = step(dict(sample, labels=learned))
    print(json.dumps({
        "masked_positions": int(masked.sum()), "learned_positions": int((~masked).sum()),
        "eod_learned": len(eod_positions),
        "same_loss_when_prompt_labels_change": loss == loss_prompt_changed,
        "same_grads_when_prompt_labels_change": bool(torch.equal(grads, grads_prompt_changed)),
        "loss_changes_with_a_learned_label": loss != loss_eod_changed,
        "grads_change_with_a_learned_label": not torch.equal(grads, grads_eod_changed)}))


if __name__ == "__main__":
    main()
