"""Megatron-LM core_r0.6.0 <-> MindSpore checkpoint conversion, shared by both directions.

The package is organised by what the two directions share:

- `topology`: rank folders and MindSpore rank numbers, both ways (tp, pp, ep, dp, cp).
- `naming`: Megatron <-> MindSpore parameter names, one table read in both directions.
- `megatron.checkpoint` / `megatron.layout`: reading Megatron files and the bucket layouts;
  `megatron.torch_writer` / `megatron.writer` / `megatron.pt_meta`: writing them back.
- `mindspore.format` / `mindspore.writer` / `mindspore.reader`: the MindSpore file formats.
- `plan`: what goes where, as plain data; `runner`: executing plans in workers; `atomic`: the one
  way files are put in place; `folder_lock` and `shard`: who writes where.
- `command`: what both command lines share; `pt2ckpt` and `ckpt2pt`: each direction's story.

The command-line tools are `convert_pt2ckpt.py` and `convert_ckpt2pt.py` (installed as the
`convert_pt2ckpt` and `convert_ckpt2pt` commands).
"""

__version__ = "0.2.0"
