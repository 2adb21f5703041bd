"""`python -m training <stage> [--preset NAME] [--config run.yaml] [--set a.b=c ...] [--dry-run]`

The one entry point of every job, on a laptop or inside a Kubernetes pod. The config is resolved and validated before
anything else runs; an invalid value exits with status 2 and names the field.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from training.config import STAGES, ConfigError, list_presets, resolve_stage_config, to_yaml

EXIT_BAD_CONFIG = 2


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
    args = parse_args(argv)
    try:
        cfg = resolve_stage_config(args.stage, args.preset, args.config, args.overrides)
    except ConfigError as err:
        print(f"{args.stage}: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    stage = importlib.import_module(f"training.stages.{args.stage}")
    manifest = stage.run(cfg)
    if manifest is not None:
        print("SEEKFLOW_RESULT " + json.dumps(manifest.get("result", {}), default=str), flush=True)
    return 0


if __name__ == "__main__":   # required: megatron's dist_checkpointing async writer spawns processes
    sys.exit(main())
