"""`python -m training.export hf --checkpoint DIR --out DIR` and `python -m training.export import-hf --hf DIR --out DIR`

hf         release checkpoint (megatron-core dist_checkpointing, any parallel layout) → Hugging Face DeepseekV3 directory
import-hf  Hugging Face DeepseekV3 directory → release checkpoint that `training.model.release.load_release` reads
Both run in one process and load the whole model into it. A bad input exits with status 2 and names the path or field.
"""
from __future__ import annotations

import argparse
import re
import sys

EXIT_BAD_INPUT = 2


def _size(text: str) -> int:
    """'5GB', '200MB', '1.5KB' or plain bytes (decimal units, as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 200MB)")
    scale = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    return max(1, int(float(match.group(1)) * scale))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hf", help="export a release checkpoint to a Hugging Face DeepseekV3 directory")
    hf.add_argument("--checkpoint", required=True, help="release checkpoint directory ({run_root}/pretrain/release)")
    hf.add_argument("--out", required=True, help="Hugging Face directory to create")
    hf.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    imp = sub.add_parser("import-hf", help="import a Hugging Face DeepseekV3 directory as a release checkpoint")
    imp.add_argument("--hf", required=True, help="Hugging Face directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="release checkpoint directory to create")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.export import ExportError, export_hf, import_hf

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        if args.command == "hf":
            export_hf(args.checkpoint, args.out, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, log=log)
        else:
            import_hf(args.hf, args.out, overwrite=args.overwrite, log=log)
    except ExportError as err:
        print(f"{args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":   # required: megatron's dist_checkpointing async writer spawns processes
    sys.exit(main())
