"""The pt_meta record: what convert_pt2ckpt keeps of each Megatron rank so the way back is exact.

`pt_meta/args_tpTT_ppPPP.pt` holds the documented keys (args, checkpoint_version, iteration,
optimizer, opt_param_scheduler, rng_state, num_floating_point_operations_so_far, and param_name_list
with --convert-param-only), exactly as the documented tool writes them, plus:

- `pt_meta_format` / `pt_meta_version`: marks a record that has the keys below;
- `state_keys`: the top-level keys of model_optim_rng.pt in saved order ('model' or 'model0', ...);
- `model_skeletons`: per model chunk, its state dict with every parameter replaced by a plain
  `{'__tensor_spec__': True, 'shape': [...], 'dtype': torch dtype}` and everything else
  (`_extra_state` included) as saved;
- `folder_name`, `iteration_dir`: `mp_rank_TT` or `mp_rank_TT_PPP`, and `iter_XXXXXXX` or `release`;
- `per_bucket_numel`, `per_bucket_numel_unpadded`: as distrib_optim.pt saved them (dtype-key
  tuples and all), None when there was no distrib_optim.pt;
- `layouts`: every grad buffer's layout (chunk, buffer index, and per parameter
  [name, dtype, shape, start, end, bucket] in buffer order), empty when none was planned.

MoE runs (expert parallelism; one record per `mp_rank_TT[_PPP]_EEE` folder, named
`args_tpTT_ppPPP_epEEE.pt`) add what rebuilding that folder's files needs:

- `distrib_form`: 'list' (distrib_optim.pt is `[dense_state, expert_state]`, the dense one None on
  ep ranks > 0) or 'dict' (a run without experts); `ep_rank`, `ep_size`, `num_local_experts`;
- `per_bucket_numel(_unpadded)` / `layouts` are then the dense optimizer's (None / empty on ep
  ranks > 0, whose file holds no dense state), and `expert_per_bucket_numel(_unpadded)` /
  `expert_layouts` the experts' (parameter names with local expert indices, as Megatron's DDP
  names them). The MindSpore files hold these experts stacked under local expert 0's name.

Everything is plain data, tensors and torch dtypes, so the file loads with `weights_only=True` and
the Megatron allow-list. A record written by the documented tool lacks the additions: the readers
below return None for them, and the way back falls back to rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .checkpoint import model_chunk_keys
from .layout import BucketCounts, BufferLayout, ParamSpan
from .writer import decode_skeleton, encode_skeleton, model_skeleton

PT_META_DIR = "pt_meta"  # under --ms-path; the way back's --param-map-path
PT_META_FORMAT = "megatron_ms_convert.pt_meta"
PT_META_VERSION = 1
DOCUMENTED_KEYS = ("args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler", "rng_state",
                   "num_floating_point_operations_so_far")


def rank_stem(tp: int, pp: int, ep: int = 0, ep_size: int = 1) -> str:
    """The part of a rank's file names that says which rank: tpTT_ppPPP, with expert parallelism
    tpTT_ppPPP_epEEE (one per (tp, pp, ep) folder, as Megatron writes them).

    >>> rank_stem(1, 2), rank_stem(1, 2, 3, ep_size=4)
    ('tp01_pp002', 'tp01_pp002_ep003')
    """
    return f"tp{tp:02}_pp{pp:03}" + (f"_ep{ep:03}" if ep_size > 1 else "")


def args_file_name(tp: int, pp: int, ep: int = 0, ep_size: int = 1) -> str:
    """The pt_meta record of one rank folder: args_tpTT_ppPPP.pt (args_tpTT_ppPPP_epEEE.pt with experts)."""
    return f"args_{rank_stem(tp, pp, ep, ep_size)}.pt"


def manifest_file_name(tp: int, pp: int, ep: int = 0, ep_size: int = 1) -> str:
    """The resume manifest of one rank (forward in pt_meta/, back in the iteration folder's .convert_ckpt2pt/)."""
    return f"manifest_{rank_stem(tp, pp, ep, ep_size)}.json"


def args_file_pattern(ep_size: int = 1) -> str:
    """How the record files are named, for messages."""
    return "args_tpTT_ppPPP_epEEE.pt" if ep_size > 1 else "args_tpTT_ppPPP.pt"


def pt_meta_record(model_sd: dict, model_file: Path, distrib: Any | None, layouts: Sequence[BufferLayout],
                   param_name_list: Sequence[Sequence[str]] | None,
                   expert_layouts: Sequence[BufferLayout] = (), moe: dict | None = None) -> dict:
    """The pt_meta dict of one rank from its loaded model_optim_rng.pt (and distrib_optim.pt, if any);
    `moe` ({'ep_rank', 'ep_size', 'num_local_experts'}) for a MoE run's folder."""
    meta = {key: model_sd.get(key) for key in DOCUMENTED_KEYS}
    if param_name_list is not None:
        meta["param_name_list"] = [list(names) for names in param_name_list]
    chunk_keys = model_chunk_keys(model_sd, model_file)
    meta.update({
        "pt_meta_format": PT_META_FORMAT,
        "pt_meta_version": PT_META_VERSION,
        "state_keys": list(model_sd),
        "model_skeletons": [encode_skeleton(model_skeleton(model_sd[key])) for key in chunk_keys],
        "folder_name": Path(model_file).parent.name,
        "iteration_dir": Path(model_file).parent.parent.name,
        "layouts": [layout_record(layout) for layout in layouts],
    })
    dense, expert = (distrib + [None, None])[:2] if isinstance(distrib, list) else (distrib, None)
    if isinstance(distrib, list) and dense is None:
        meta["layouts"] = []  # the folder's file holds no dense state; ep rank 0's record has its layout
    for prefix, state in (("", dense), ("expert_", expert)):
        for key in ("per_bucket_numel", "per_bucket_numel_unpadded"):
            meta[prefix + key] = state.get(key) if isinstance(state, dict) else None
    if moe is not None or isinstance(distrib, list):
        meta.update(distrib_form="list" if isinstance(distrib, list) else "dict",
                    expert_layouts=[layout_record(layout) for layout in expert_layouts], **(moe or {}))
    return meta


def layout_record(layout: BufferLayout) -> dict:
    return {"chunk": layout.chunk, "buffer_index": layout.buffer_index,
            "params": [[p.name, p.dtype, list(p.shape), p.start, p.end, p.bucket] for p in layout.params]}


def has_additions(meta: dict) -> bool:
    """True for a record written by this package, False for one of the documented tool."""
    return meta.get("pt_meta_format") == PT_META_FORMAT


def skeletons_from_meta(meta: dict) -> list[dict] | None:
    """The model chunk skeletons (TensorSpec leaves), or None for a documented record."""
    return [decode_skeleton(s) for s in meta["model_skeletons"]] if has_additions(meta) else None


def layouts_from_meta(meta: dict, source: str, part: str = "") -> list[BufferLayout] | None:
    """The grad-buffer layouts recorded at conversion time, or None when none were recorded; `part`
    'expert_' for a MoE record's expert buffers."""
    if not has_additions(meta) or not meta.get(part + "layouts"):
        return None
    what = "expert layout" if part else "layout"
    return [BufferLayout(rec["chunk"], rec["buffer_index"],
                         tuple(ParamSpan(name, dtype, tuple(shape), start, end, bucket)
                               for name, dtype, shape, start, end, bucket in rec["params"]),
                         f"{source} ({what} of chunk {rec['chunk']} buffer {rec['buffer_index']})")
            for rec in meta[part + "layouts"]]


def counts_from_meta(meta: dict, part: str = "") -> list[BucketCounts] | None:
    """The source's bucket sizes per grad buffer as distrib_optim.pt saved them, or None; `part`
    'expert_' for a MoE record's expert buffers."""
    padded_all, unpadded_all = meta.get(part + "per_bucket_numel"), meta.get(part + "per_bucket_numel_unpadded")
    if not has_additions(meta) or padded_all is None or unpadded_all is None:
        return None
    counts = []
    for gbuf, (padded, unpadded) in enumerate(zip(padded_all, unpadded_all)):
        [(key, sizes)] = padded.items()
        counts.append(BucketCounts(gbuf, (str(key[0]), str(key[1])), tuple(sizes), tuple(unpadded[key])))
    return counts


def is_moe_record(meta: dict) -> bool:
    """A record of a run with experts (its MindSpore files hold them stacked per rank)."""
    return has_additions(meta) and bool(meta.get("num_local_experts"))
