"""param_map reading and bucket layouts: where each parameter lives inside the distributed
optimizer's buckets.

A *layout* is one grad buffer of one model chunk: its parameters in buffer order, each with its span
in the whole buffer and its bucket. Layouts come from the param_map JSON files the patched trainer
writes (`read_rank_layouts`), or are inferred from the checkpoint itself (`infer_layouts`); either
way `check_layouts` holds them against distrib_optim.pt before a byte is written. The code lives in
`megatron_ms_convert.megatron.layout`; this module is its stable public face, installed inside the
package (a checkout also has `param_map_utils.py` at its top, which re-exports this module, as the
documented tool's interface expects it there).

    >>> counts = [BucketCounts(0, ("torch.float32", "torch.float32"), (4,), (3,))]
    >>> [layout] = infer_layouts([[("w", (3,), "torch.float32")]], counts, grad_in_fp32=False, wrapped=False)
    >>> layout.params[0].start, layout.params[0].end, layout.params[0].bucket
    (0, 3, 0)
"""

from megatron_ms_convert.megatron.layout import (BucketBounds, BucketCounts, BufferLayout, BufferSidecar, ParamSpan,
                                                 check_layouts, ddp_name_for, expert_param_map_file_name,
                                                 infer_layouts, layout_differences, list_expert_param_map_files,
                                                 list_param_map_files, param_map_file_name, param_map_json,
                                                 parse_param_map, read_rank_layouts, read_sidecar, state_key_for)

__all__ = ["BucketBounds", "BucketCounts", "BufferLayout", "BufferSidecar", "ParamSpan", "check_layouts",
           "ddp_name_for", "expert_param_map_file_name", "infer_layouts", "layout_differences",
           "list_expert_param_map_files", "list_param_map_files", "param_map_file_name",
           "param_map_json", "parse_param_map", "read_rank_layouts", "read_sidecar", "state_key_for"]
