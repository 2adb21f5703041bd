"""Writes a release checkpoint of a context-extended model for tests/training/eval/test_long_context_evaluate.py, in
its own process (the CPU shim patches process-global state):

    python long_context_release.py OUT_DIR

The smallest model the evaluate stage can run: one dense MLA layer, no MTP, with the real DeepSeek vocabulary (the
stage encodes with the real tokenizer, so the micro preset's 512-row vocabulary cannot be scored), YaRN s = 4 from a
64-token context to 256 (the tiny profile's extension), randomly initialised: the test checks what evaluation
computes and logs, not what a model learned.
"""
import sys
from pathlib import Path


def main(out: str) -> None:
    from training import checkpoint
    from training.config import ModelConfig, ParallelConfig, YarnConfig
    from training.model.build import build_gpt
    from training.parallel.setup import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    model = ModelConfig(name="tiny-yarn", num_layers=1, num_experts=None, mtp_num_layers=0, max_position_embeddings=256,
                        rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=64))
    gpt, _ = build_gpt(model, ParallelConfig(), seed=0)
    checkpoint.save_release(Path(out), gpt, model)
    shutdown()


if __name__ == "__main__":   # dist_checkpointing's async writer spawns processes
    main(sys.argv[1])
