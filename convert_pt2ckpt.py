"""Convert a Megatron-LM core_r0.6.0 distributed-optimizer checkpoint into MindSpore checkpoints.

Run it from a checkout (`python convert_pt2ckpt.py -h`) or as the installed `convert_pt2ckpt`
command; the work is done by the `megatron_ms_convert` package beside this file.
"""

from megatron_ms_convert.pt2ckpt import build_parser, cli, main

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()
