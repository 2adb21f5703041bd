"""What the pretrain stage's Trainer costs on top of a bare megatron-core loop, in one process, on the same model.

The bare loop: get_forward_backward_func + optimizer.step + scheduler.step on the train module's own model, optimizer
and data (megatron's plain finalize_model_grads, no metrics, no checkpoints, no MLflow). The Trainer: its loop
(`run_loop`) with every metric and callback (token schedules, expert-load snapshots and their all_gather, MaxVio, bias
norms, FLOPs) and progress lines each `log_interval`; checkpoints are switched off (save_interval past the run, no
release save) and MLflow is off, so the ratio is the loop's own overhead. Rounds alternate bare / Trainer in ABBA
order, so that a drift in step times over the run favours neither.

    python benchmarks/pretrain_overhead.py [--steps 40] [--rounds 3] [--log-interval 10]
Prints the overhead ratio (Trainer time / bare time); the target is <= 1.02.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCAB = 512


def synthetic_curate(run_root: Path) -> dict:
    """A small indexed dataset of patterned token streams and a curate manifest over it."""
    from training.data.synthetic import write_synthetic_curate

    return write_synthetic_curate(run_root, vocab_size=VOCAB, documents=400)


def bare_steps(trainer, steps: int) -> float:
    """The minimal megatron-core loop on the trainer's model/optimizer/data."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    module, train = trainer.module, trainer.train
    tconfig = module.tconfigs[0]   # the schedule reads the first model chunk's config
    saved = tconfig.finalize_model_grads_func
    tconfig.finalize_model_grads_func = finalize_model_grads
    forward_backward = get_forward_backward_func()
    num_microbatches = module.ramp.num_microbatches(module.consumed_samples)   # no ramp here: fixed
    started = time.perf_counter()
    for _ in range(steps):
        for chunk in module.wrapped:
            chunk.zero_grad_buffer()
        module.optimizer.zero_grad()
        forward_backward(forward_step_func=module.forward_step, data_iterator=module.batches, model=module.wrapped,
                         num_microbatches=num_microbatches, seq_length=train.seq_length,
                         micro_batch_size=train.micro_batch_size, forward_only=False)
        module.optimizer.step()
        module.scheduler.step(increment=1)
    elapsed = time.perf_counter() - started
    tconfig.finalize_model_grads_func = saved
    _clear_trackers(trainer)
    return elapsed


def _clear_trackers(trainer):
    """Drop what the bare loop left in megatron's loss trackers and the routers' counts, so the Trainer's next
    window starts clean."""
    from training.train.losses import auxiliary_losses

    auxiliary_losses(trainer.module.cfg.model, 1)


def trainer_steps(trainer, steps: int) -> float:
    """`steps` more steps through the Trainer's own loop (no release save: that is fit's, after the loop)."""
    trainer.train.steps = trainer.step + steps
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.run_loop()
    return time.perf_counter() - started


@contextlib.contextmanager
def bookkeeping_timer(trainer):
    """Time what the Trainer does that the bare loop does not (its metrics, schedules and progress), by wrapping
    each of those calls; yields a one-item list holding the seconds spent in them. Far less noisy than the ratio of
    two wall-clock rounds, which this machine moves by several per cent from round to round."""
    from training.train import losses

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - started
        return wrapper

    # the step's loss reductions, the callbacks (token schedules; expert-load collect and metrics), progress lines
    targets = [(losses, "global_mean_losses"), (losses, "auxiliary_losses"), (trainer, "_report"),
               (trainer, "_throughput")]
    targets += [(callback, name) for callback in trainer.callbacks for name in ("pre_step", "log_metrics")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
    for owner, name, fn in originals:
        setattr(owner, name, timed(fn))
    hooks = trainer.module.grad_finalize_hooks   # the expert-load snapshot in finalize_model_grads
    saved_hooks = list(hooks)
    hooks[:] = [timed(hook) for hook in hooks]
    try:
        yield spent
    finally:
        hooks[:] = saved_hooks
        for owner, name, fn in originals:
            if owner is losses:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)   # drop the instance attribute: the class's method shows through again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-interval", type=int, default=10)
    args = parser.parse_args()

    from training.config import PretrainConfig, config_hash
    from training.config.loader import load_preset, stage_view
    from training.parallel.setup import init_distributed, shutdown
    from training.stages import pretrain
    from training.stages.lifecycle import StageRun

    root = Path(tempfile.mkdtemp(prefix="seekflow-overhead-"))
    curate = synthetic_curate(root)
    doc = stage_view(load_preset("tiny"), "pretrain")
    doc.update(run_root=str(root))
    doc["model"].update(vocab_size=VOCAB)
    total = args.steps * (2 * args.rounds + 2) + 1
    doc["train"].update(steps=total, seq_length=32, micro_batch_size=2, global_batch_size=4,
                        log_interval=args.log_interval, save_interval=10 * total)
    cfg = PretrainConfig.model_validate(doc)
    info = init_distributed(cfg.parallel, cfg.seed)
    try:
        stage = StageRun(cfg, "pretrain", config_hash(cfg), inputs={}, started=time.time(), writes=True)
        trainer = pretrain.build_trainer(cfg, curate, stage, info)
        trainer.save = lambda: None            # no checkpoints in either loop
        trainer.prepare()
        bare_steps(trainer, args.steps)        # warm-up (allocations, first-step costs), not timed
        trainer.step += args.steps
        bare, managed = [], []
        with bookkeeping_timer(trainer) as spent:   # one more Trainer round, timed call by call
            bookkept = trainer_steps(trainer, args.steps)
        for round_ in range(args.rounds):
            # ABBA order: steps get faster (or slower) over a run on a noisy machine; alternating who goes first
            # keeps that drift from favouring either loop.
            for which in (("bare", "trainer") if round_ % 2 == 0 else ("trainer", "bare")):
                if which == "bare":
                    bare.append(bare_steps(trainer, args.steps))
                    trainer.step += args.steps
                else:
                    managed.append(trainer_steps(trainer, args.steps))
        b, m = min(bare), min(managed)
        print(f"bare loop   : {' '.join(f'{t:.2f}' for t in bare)} s per {args.steps} steps (best {b:.2f})")
        print(f"Trainer     : {' '.join(f'{t:.2f}' for t in managed)} s per {args.steps} steps (best {m:.2f})")
        print(f"overhead ratio (best Trainer / best bare): {m / b:.3f}   "
              f"(median ratio {sorted(x / y for x, y in zip(managed, bare))[len(bare) // 2]:.3f}; target <= 1.02)")
        print(f"Trainer bookkeeping (metrics, schedules, progress; timed per call in an extra round): "
              f"{spent[0]:.3f} s of {bookkept:.2f} s = {100 * spent[0] / bookkept:.2f}% "
              f"(ratio {bookkept / (bookkept - spent[0]):.3f} if that were all)")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
