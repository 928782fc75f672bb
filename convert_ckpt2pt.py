"""Convert per-rank MindSpore checkpoints (written by convert_pt2ckpt.py, possibly trained on by
MindSpore since) back into a Megatron-LM core_r0.6.0 checkpoint.

Run it from a checkout (`python convert_ckpt2pt.py -h`) or as the installed `convert_ckpt2pt`
command; the work is done by the `megatron_ms_convert` package beside this file. The flags are
parsed before the conversion is imported, so `-h` and a wrong flag answer at once, without loading
torch (docs/usage.md is the full reference).
"""

import sys
from typing import Sequence

from megatron_ms_convert.flags import ckpt2pt_parser as build_parser

__all__ = ["build_parser", "cli", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, then convert; returns the exit code."""
    ns = build_parser().parse_args(argv)
    from megatron_ms_convert.ckpt2pt import run  # torch, numpy: only once the flags are known to be good
    return run(ns)


def cli() -> None:
    """Entry point of this script and of the installed `convert_ckpt2pt` command."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
