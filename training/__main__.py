"""`python -m training <stage> [--preset NAME] [--config run.yaml] [--set a.b=c ...] [--dry-run]`

Two planning tools share the entry point (pure Python, nothing is built): `python -m training params --preset NAME`
counts total / activated / MTP parameters, and `python -m training plan --compute FLOPS [--preset NAME]` applies
DeepSeek LLM's scaling laws (batch size, learning rate, model and data scale).

The one entry point of every job, on a laptop or inside a Kubernetes pod. The config is resolved and validated before
anything else runs; an invalid value exits with status 2 and names the field.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys

from training.config import STAGES, ConfigError, list_presets, resolve_stage_config, to_yaml

EXIT_BAD_CONFIG = 2
EXIT_BAD_INPUT = 3
# Printed (on stdout, which torchrun and the pod logs pass on) before exiting on bad input: the operator then fails
# the task without retrying it (operators/backends/base.py FAILURE_PREFIX).
FAILURE_PREFIX = "SEEKFLOW_FAILURE "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("--preset", help=f"named preset ({', '.join(list_presets())})")
    parser.add_argument("--config", help="stage config YAML file, or env:VAR to read it from an environment variable "
                                         "(applied over the preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                        help="override one field; the value is parsed as YAML (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PLANNING_TOOLS:
        return PLANNING_TOOLS[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        cfg = resolve_stage_config(args.stage, args.preset, args.config, args.overrides)
    except ConfigError as err:
        _report_bad_input(args.stage, err, f"{args.stage}: {err}")
        return EXIT_BAD_CONFIG
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    stage = importlib.import_module(f"training.stages.{args.stage}")
    try:
        manifest = stage.run(cfg)
    except Exception as err:
        if not getattr(err, "permanent", False):
            raise   # transient or unexpected: the traceback, and the task's retries
        _report_bad_input(args.stage, err, f"{args.stage}: {type(err).__name__}: {err}")
        return EXIT_BAD_INPUT
    if manifest is not None:
        # One write (print makes two: text, then newline): another rank's line cannot land inside it on a pipe.
        sys.stdout.write("SEEKFLOW_RESULT " + json.dumps(manifest.get("result", {}), default=str) + "\n")
        sys.stdout.flush()
    return 0


def _report_bad_input(stage: str, err: Exception, message: str) -> None:
    """Bad input (an error class with `permanent = True`): say so for the operator, and the reason for people."""
    print(FAILURE_PREFIX + json.dumps({"stage": stage, "error": f"{type(err).__name__}: {err}"}), flush=True)
    print(message, file=sys.stderr, flush=True)


def _params(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training params",
                                     description="Count a preset's parameters, or a release's non-zero ones.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"named preset ({', '.join(list_presets())})")
    source.add_argument("--release", help="a release directory: count its non-zero parameters (a pruned model's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.x=y",
                        help="override one pretrain field, e.g. model.mtp_num_layers=0 (repeatable)")
    args = parser.parse_args(argv)
    if args.release:
        from training.integrity import IntegrityError
        from training.model.release import ReleaseError, format_nonzero, nonzero_parameters

        try:
            print(format_nonzero(args.release, nonzero_parameters(args.release)), end="")
        except (ReleaseError, IntegrityError, OSError) as err:
            print(f"params: --release {args.release}: {err}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return 0
    from training.model.params import count_params, format_count

    try:
        cfg = resolve_stage_config("pretrain", args.preset, overrides=args.overrides)
    except ConfigError as err:
        print(f"params: --preset {args.preset}: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(format_count(args.preset, count_params(cfg.model)), end="")
    return 0


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training plan",
                                     description="DeepSeek LLM scaling laws (arXiv:2401.02954 §3) for a compute budget.")
    parser.add_argument("--compute", required=True, type=float, help="training compute C in FLOPs, e.g. 1e20")
    parser.add_argument("--preset", help="also size this preset's run: tokens, global batch and steps for C")
    args = parser.parse_args(argv)
    from training.model.params import format_plan, plan

    if not args.compute > 0 or args.compute == float("inf"):
        print(f"plan: --compute must be a positive, finite number of FLOPs (got {args.compute:g})", file=sys.stderr)
        return EXIT_BAD_CONFIG
    model, seq = None, 4096
    if args.preset is not None:
        try:
            cfg = resolve_stage_config("pretrain", args.preset)
        except ConfigError as err:
            print(f"plan: --preset {args.preset}: {err}", file=sys.stderr)
            return EXIT_BAD_CONFIG
        model, seq = cfg.model, cfg.train.seq_length
    print(format_plan(plan(args.compute), args.preset, model, seq), end="")
    return 0


PLANNING_TOOLS = {"params": _params, "plan": _plan}


def exit_now(code: int) -> None:
    """Leave without tearing the interpreter down: freeing torch's and megatron's module graphs takes ~1.4 s a process
    on these machines, for nothing. Everything the job owes runs first: the exit handlers (MLflow, logging, temporary
    files: `atexit`), then the flush of stdout and stderr."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)   # CPython's; elsewhere, the ordinary exit
    if run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":   # required: megatron's dist_checkpointing async writer spawns processes
    exit_now(main())   # (an exception still ends the ordinary way, with its traceback)
