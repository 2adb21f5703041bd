"""Megatron-side checks of the generator's KV cache (training/eval/kv_cache.py), each in its own process (the CPU shim
and megatron's parallel state are process-global):

    torchrun --nproc-per-node 2 generate_cache_check.py save EP2 OUT_DIR [PP2 OUT_DIR ...]
        the layout model built (layout-invariantly, by seed) under each layout in turn, saved as a release in its
        OUT_DIR, and decoded there on its shards (model_parallel.py), into OUT_DIR-decoded.json
    python generate_cache_check.py check OUT.json [RELEASE_DIR ...]
        for every model (below, then each release), greedy decoding with and without the cache, plus the stopping
        rules and sampling, written to OUT.json

Models, all random (a larger init than the default, so that greedy decoding does not settle on one token):
  mla_moe_mtp   the micro preset's architecture (MLA, 1 dense + 2 MoE layers, shared expert, MTP), vocabulary 512
  yarn          a dense MLA model with YaRN s = 4 from a 16-token original context, decoded well past it
  vocab_subset  DeepSeek's BPE cut to 3,824 merges (4,096 rows), prompts encoded from text
  layout        the micro architecture with 4 layers (PP2: 2 per stage), drawn by seed in one process and under
                each layout (training/model/init.py makes the draws equal), the latter loaded from its release
"""
import json
import sys
from pathlib import Path

import torch

PROMPT_LENGTHS = (5, 11, 2, 17, 8)   # batched by length, 3 to a batch: (2, 5, 8) and (11, 17)
NEW_TOKENS = 24
SAMPLED = dict(max_new_tokens=8, temperature=1.5, top_p=0.9)


def layout_model():
    from training.config import ModelConfig

    return ModelConfig(name="layout", num_layers=4, vocab_size=512, max_position_embeddings=128, init_method_std=0.2,
                       moe_router_topk=4)


def models():
    from training.config import ModelConfig, YarnConfig

    micro = dict(vocab_size=512, max_position_embeddings=128, init_method_std=0.2, moe_router_topk=4)
    return {
        "mla_moe_mtp": ModelConfig(name="micro", **micro),
        "yarn": ModelConfig(name="yarn", num_layers=2, num_experts=None, mtp_num_layers=0, **micro,
                            rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=16)),
        "vocab_subset": ModelConfig(name="subset", vocab_size=4096, vocab_merges=3824, max_position_embeddings=128,
                                    init_method_std=0.2, num_layers=2, mtp_num_layers=0),
    }


LAYOUTS = {"EP2": dict(expert_model_parallel_size=2), "PP2": dict(pipeline_model_parallel_size=2)}


def save(*layouts_and_dirs: str) -> None:
    """Each layout in turn on the same processes (one launch): its groups, the model, its release."""
    from megatron.core import parallel_state

    from training import checkpoint
    from training.config import ParallelConfig
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    for layout, out_dir in zip(layouts_and_dirs[::2], layouts_and_dirs[1::2]):
        parallel = ParallelConfig(**LAYOUTS[layout])
        init_distributed(parallel, seed=0)
        gpt, _ = build_gpt(layout_model(), parallel, seed=7)
        checkpoint.save_release(Path(out_dir), gpt, layout_model())
        gpt.eval()
        decoded = decode_under_the_layout(gpt, layout)
        if torch.distributed.get_rank() == 0:
            decoded_file(out_dir).write_text(json.dumps(decoded))
        parallel_state.destroy_model_parallel()
    shutdown()


def decoded_file(release) -> Path:
    """Beside the release (whose directory holds only what its complete.json lists)."""
    return Path(release).parent / f"{Path(release).name}-decoded.json"


def decode_under_the_layout(gpt, layout: str) -> dict:
    """Greedy and sampled decoding on this rank's shard (training/eval/model_parallel.py). EP2: rank 0 decodes
    prompts 0-1 and rank 1 prompts 2-4, whose lengths differ (30 and 39 decoding steps: rank 0 idles in lockstep);
    PP2: both stages decode every prompt. Returns every prompt's tokens, in order."""
    import torch.distributed as dist

    from training.eval.generate import Generator, row_seeds

    gen = Generator(gpt, 128, batch_size=3, model_parallel=True)
    prompts = prompts_for(gen, "layout")
    mine = list(range(len(prompts)))
    if layout == "EP2":
        mine = mine[:2] if dist.get_rank() == 0 else mine[2:]
    seeds = row_seeds(1, len(prompts))   # each row's stream, as in one process's call with seed 1
    part = {"rows": mine, "greedy": tokens(gen.generate([prompts[i] for i in mine], NEW_TOKENS)),
            "sampled": tokens(gen.generate([prompts[i] for i in mine], SAMPLED["max_new_tokens"],
                                           temperature=SAMPLED["temperature"], top_p=SAMPLED["top_p"],
                                           seeds=[seeds[i] for i in mine]))}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    decoded = {"greedy": [None] * len(prompts), "sampled": [None] * len(prompts)}
    for share in parts if layout == "EP2" else parts[:1]:
        for key in decoded:
            for row, out in zip(share["rows"], share[key]):
                decoded[key][row] = out
    return decoded


def prompts_for(gen, name: str) -> list[list[int]]:
    if name == "vocab_subset":
        text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
        ids = gen.encode(text * 2)
    else:
        ids = torch.randint(3, 500, (64,), generator=torch.Generator().manual_seed(len(name))).tolist()
    return [ids[i:i + n] for i, n in enumerate(PROMPT_LENGTHS)]


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def greedy(gen, prompts) -> dict:
    """Greedy tokens and stop reasons with and without the cache."""
    cached, uncached = gen.generate(prompts, NEW_TOKENS), gen.generate(prompts, NEW_TOKENS, use_cache=False)
    return {"cached": tokens(cached), "uncached": tokens(uncached),
            "reasons": [o.stop_reason for o in cached], "uncached_reasons": [o.stop_reason for o in uncached]}


def stopping_and_sampling(gen, prompts, report) -> dict:
    """The stopping rules (each path) and sampling, given the model's greedy `report`."""
    # stop_token_ids: the first of row 0's greedy tokens from the 5th on not seen before it ends row 0 there
    row0 = report["cached"][0]
    cut = next(i for i in range(4, len(row0)) if row0[i] not in row0[:i])
    report["stop_token"] = {"expected": row0[:cut], "token": row0[cut], **{
        key: [(o.token_ids, o.stop_reason, o.stop_token_id) for o in
              gen.generate(prompts, NEW_TOKENS, stop_token_ids=[row0[cut]], use_cache=use_cache)]
        for key, use_cache in (("cached", True), ("uncached", False))}}
    # max_new_tokens 0 and 3; a prompt 4 positions short of the context ends "context_full" after 4 new tokens
    report["zero"] = [(o.token_ids, o.text, o.stop_reason) for o in gen.generate(prompts, 0)]
    report["three"] = tokens(gen.generate(prompts, 3))
    long_prompt = (prompts[3] * gen.max_positions)[:gen.max_positions - 4]
    report["context_full"] = [(o.token_ids, o.stop_reason) for o in
                              [gen.generate([long_prompt], 10, use_cache=c)[0] for c in (True, False)]]
    # sampling: per seed, with or without the cache, one prompt per batch or three
    sampled = SAMPLED
    report["sampled"] = {"seed1": tokens(gen.generate(prompts, seed=1, **sampled)),
                         "seed1_again": tokens(gen.generate(prompts, seed=1, **sampled)),
                         "seed1_uncached": tokens(gen.generate(prompts, seed=1, use_cache=False, **sampled)),
                         "seed2": tokens(gen.generate(prompts, seed=2, **sampled))}
    gen.batch_size = 1
    report["sampled"]["seed1_one_per_batch"] = tokens(gen.generate(prompts, seed=1, **sampled))
    report["alone"] = tokens(gen.generate(prompts, NEW_TOKENS))   # greedy, one prompt per batch
    return report


def stop_string(gen, prompts, report) -> dict:
    """A stop string: the text of row 1's greedy tokens 4-6; the row ends at the first token completing it."""
    row1 = report["cached"][1]
    stop = gen.decode(row1[4:7])
    first = next(m for m in range(1, len(row1) + 1) if stop in gen.decode(row1[:m]))
    report["stop_string"] = {"stop": stop, "expected": row1[:first], "text": gen.decode(row1[:first]).split(stop)[0],
                             **{key: [(o.token_ids, o.stop_reason, o.text) for o in
                                      gen.generate(prompts, NEW_TOKENS, stop=[stop], use_cache=use_cache)]
                                for key, use_cache in (("cached", True), ("uncached", False))}}
    return report


def check(out_file: str, *releases: str) -> None:
    from training.config import ParallelConfig
    from training.eval.generate import Generator
    from training.model.build import build_gpt
    from training.model.release import load_release
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    report = {}
    for name, model in models().items():
        gpt, _ = build_gpt(model, ParallelConfig(), seed=1)
        gpt.eval()
        gen = Generator(gpt, model.max_position_embeddings, batch_size=3, vocab_merges=model.vocab_merges)
        prompts = prompts_for(gen, name)
        report[name] = greedy(gen, prompts)
        if name == "mla_moe_mtp":
            stopping_and_sampling(gen, prompts, report[name])
        if name == "vocab_subset":
            stop_string(gen, prompts, report[name])
    if releases:   # the layout model as one process builds it, then as each layout saved it
        gpt, _ = build_gpt(layout_model(), ParallelConfig(), seed=7)
        gpt.eval()
        prompts = prompts_for(Generator(gpt, 128), "layout")
        one = Generator(gpt, 128, batch_size=3)
        report["layout_one_process"] = tokens(one.generate(prompts, NEW_TOKENS))
        report["layout_one_process_sampled"] = tokens(one.generate(prompts, seed=1, **SAMPLED))
        for release in releases:
            gpt, model = load_release(release)
            gen = Generator(gpt, model.max_position_embeddings, batch_size=3)
            report[f"release_{Path(release).name}"] = {
                "cached": tokens(gen.generate(prompts, NEW_TOKENS)),
                "uncached": tokens(gen.generate(prompts, NEW_TOKENS, use_cache=False)),
                "decoded_under_the_layout": json.loads(decoded_file(release).read_text())}
    Path(out_file).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":   # dist_checkpointing's async writer spawns processes
    {"save": save, "check": check}[sys.argv[1]](*sys.argv[2:])
