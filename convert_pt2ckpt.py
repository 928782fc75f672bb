"""Convert a Megatron-LM core_r0.6.0 distributed-optimizer checkpoint into MindSpore checkpoints.

Run it from a checkout (`python convert_pt2ckpt.py -h`) or as the installed `convert_pt2ckpt`
command; the work is done by the `megatron_ms_convert` package beside this file. The flags are
parsed before the conversion is imported, so `-h` and a wrong flag answer at once, without loading
torch (docs/usage.md is the full reference).
"""

import sys
from typing import Sequence

from megatron_ms_convert.flags import pt2ckpt_parser as build_parser

__all__ = ["build_parser", "cli", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, then convert; returns the exit code."""
    ns = build_parser().parse_args(argv)
    from megatron_ms_convert.pt2ckpt import run  # torch, numpy: only once the flags are known to be good
    return run(ns)


def cli() -> None:
    """Entry point of this script and of the installed `convert_pt2ckpt` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
