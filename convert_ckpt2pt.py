"""Convert per-rank MindSpore checkpoints (written by convert_pt2ckpt.py, possibly trained on by
MindSpore since) back into a Megatron-LM core_r0.6.0 checkpoint.

Run it from a checkout (`python convert_ckpt2pt.py -h`) or as the installed `convert_ckpt2pt`
command; the work is done by the `megatron_ms_convert` package beside this file.
"""

from megatron_ms_convert.ckpt2pt import build_parser, cli, main

__all__ = ["build_parser", "cli", "main"]

if __name__ == "__main__":
    cli()
