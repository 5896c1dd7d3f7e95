"""``megatrain-export``: a checkpoint -> a Hugging Face model directory (``megatrain.hf_export``).

    megatrain-export --checkpoint outputs/quickstart --out hf/quickstart
"""

from __future__ import annotations

import argparse
import sys

from megatrain.cli.common import run_command
from megatrain.hf_export import export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatrain-export",
                                description="a checkpoint -> a Hugging Face model directory")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, help="the Hugging Face directory to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(lambda: _export(args))


def _export(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
