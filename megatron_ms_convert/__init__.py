"""Megatron-LM core_r0.6.0 <-> MindSpore checkpoint conversion, shared by both directions.

The package is organised by what the two directions share:

- `topology`: rank folders and MindSpore rank numbers, both ways.
- `naming`: Megatron <-> MindSpore parameter names, one table read in both directions.
- `megatron.checkpoint` / `megatron.layout`: reading Megatron files and the bucket layouts.
- `mindspore.format` / `mindspore.writer`: the MindSpore file formats.
- `plan`: what goes where, as plain data; `runner`: executing plans in workers; `atomic`: the one
  way files are put in place.

The command-line tools are `convert_pt2ckpt.py` (and its installed `convert_pt2ckpt` command).
"""

__version__ = "0.2.0"
