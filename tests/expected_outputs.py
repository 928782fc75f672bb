"""The test oracle: what the MindSpore files must contain, computed from a checkpoint's own record.

A record is the `expected.json` + `expected.pt` pair that Megatron's sample and our fixture generator
write beside a checkpoint (names, global layers, shapes and the full tensors they stored). Names and
rank numbers follow the output format (docs/output-format.md) and the MindSpore model's names
(docs/names.md), re-implemented here on purpose (by substitution, not by the converter's rule table):
the converter's own naming code is what is under test. tests/mindspeed_model_facts.py checks these
names once more against the MindSpore model's own structure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "convert_pt2ckpt.py"
SAMPLE = REPO / "tests" / "data" / "megatron_sample"
VPP_SAMPLE = REPO / "tests" / "data" / "megatron_vpp_sample"

_RENAMES = {"self_attention": "attention", "query_key_value": "qkv_proj", "dense": "out_proj",
            "dense_h_to_4h": "mapping", "dense_4h_to_h": "projection"}
# mcore -> legacy Megatron names, as megatron/core/inference/gpt/state_dict_hooks.py pairs them up
_MCORE_FUSED_NORMS = ((".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
                      (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."))
_MCORE_PREFIXES = (("decoder.final_layernorm.", "language_model.encoder.final_norm."),
                   ("decoder.layers.", "language_model.encoder.layers."),
                   ("embedding.", "language_model.embedding."),
                   ("output_layer.", "language_model.output_layer."))
_MCORE_PARTS = {"input_layernorm": "input_norm", "pre_mlp_layernorm": "post_attention_norm",
                "linear_qkv": "query_key_value", "linear_proj": "dense", "linear_fc1": "dense_h_to_4h",
                "linear_fc2": "dense_4h_to_h"}
_LR_STYLES = ["constant", "WSD", "linear", "cosine", "inverse-square-root"]
_WD_STYLES = ["constant", "linear", "cosine"]


@dataclass
class Record:
    meta: dict
    params: list[dict]
    tensors: dict[str, torch.Tensor]


def load_record(root: Path) -> Record:
    raw = json.loads((Path(root) / "expected.json").read_text())
    if (Path(root) / "expected.pt").is_file():
        tensors = torch.load(Path(root) / "expected.pt", weights_only=True)
    else:
        tensors = tensors_from_codes(raw["params"])
    return Record(raw["meta"], raw["params"], tensors)


def tensors_from_codes(params: list[dict]) -> dict[str, torch.Tensor]:
    """A record without expected.pt stores each parameter's `code`: element j holds v = code + j,
    param = v, exp_avg = -v, exp_avg_sq = v + 0.5, and the model copy is bf16(v). The digests the
    record also holds are checked, so the rule cannot silently disagree with what was written."""
    out = {}
    for entry in params:
        numel = 1
        for d in entry["shape"]:
            numel *= d
        v = torch.arange(entry["code"], entry["code"] + numel, dtype=torch.float64).float().reshape(entry["shape"])
        states = {"param": v, "exp_avg": -v, "exp_avg_sq": v + 0.5, "model_bf16": v.bfloat16()}
        for state, tensor in states.items():
            flat = tensor.double().flatten()
            digest = entry[state]
            assert flat[:4].tolist() == digest["first"] and flat[-4:].tolist() == digest["last"], entry["key"]
            assert float(flat.sum()) == digest["sum"], (entry["key"], state)
            out[f"{entry['key']}::{state}"] = tensor
    return out


# megatron-core (local spec) component -> MindSpeed-Core-MS legacy model component (mindspeed_model_facts)
_COMPONENTS = {"decoder": "language_model.encoder", "embedding": "language_model.embedding",
               "output_layer": "language_model.output_layer", "self_attention": "attention",
               "linear_qkv": "qkv_proj", "linear_proj": "out_proj", "input_layernorm": "input_norm",
               "pre_mlp_layernorm": "post_attention_norm", "final_layernorm": "final_norm",
               "linear_fc1": "mapping", "linear_fc2": "projection", "router": "router.gating"}
_NORM_LEAVES = {"weight": "gamma", "bias": "beta"}


def mcore_mindspeed_name(name: str, layer_offset: int = 0) -> str:
    """MindSpeed-Core-MS name of a megatron-core (local layer spec, LayerNorm) parameter name, layer
    numbers shifted by layer_offset; written from the MindSpeed model facts, not the converter's table."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "layers" and parts[i].isdigit():
            parts[i] = str(int(parts[i]) + layer_offset)
    if parts[-2:] == ["position_embeddings", "weight"]:
        parts[-1] = "embedding_table"
    if parts[-2] in ("input_layernorm", "pre_mlp_layernorm", "final_layernorm"):
        parts[-1] = _NORM_LEAVES[parts[-1]]
    return ".".join(_COMPONENTS.get(p, p) for p in parts)


def documented_name(dotted: str) -> str:
    """The documented tool's name: `module` dropped, five legacy components renamed."""
    return ".".join(_RENAMES.get(p, p) for p in dotted.split(".") if p != "module")


def _mcore_as_legacy(name: str) -> str:
    for fused, plain in _MCORE_FUSED_NORMS:
        name = name.replace(fused, plain)
    for old, new in _MCORE_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return ".".join(_MCORE_PARTS.get(p, p) for p in name.split("."))


def ms_name(dotted: str, meta: dict | None = None, style: str = "mindspeed") -> str:
    """The MindSpore name of a Megatron name (global layer numbers already in it). `meta` is the
    record's meta: model family and normalization (the Megatron sample's: legacy, LayerNorm)."""
    if style == "documented":
        return documented_name(dotted)
    meta = meta or {}
    name = ".".join(p for p in dotted.split(".") if p != "module")
    if meta.get("model", "legacy") == "mcore":
        name = _mcore_as_legacy(name)
    elif name in ("word_embeddings.weight", "word_embeddings_for_head.weight"):
        name = "language_model.output_layer.weight"  # the last stage's copy of tied embeddings
    parts = documented_name(name).split(".")
    if parts[-2] == "position_embeddings":
        parts[-1] = "embedding_table"  # an nn.Embedding
    if parts[-2].endswith("_norm") and meta.get("normalization", "LayerNorm") == "LayerNorm":
        parts[-1] = {"weight": "gamma", "bias": "beta"}[parts[-1]]
    return ".".join(parts)


def state_key(entry: dict) -> str:
    """The param's key inside model_optim_rng.pt (the sample's record predates this field)."""
    if "state_dict_key" in entry:
        return entry["state_dict_key"]
    key = entry["name"][len("module."):] if entry["name"].startswith("module.") else entry["name"]
    return "word_embeddings_for_head.weight" if key == "word_embeddings.weight" else key


def with_global_layer(dotted: str, entry: dict) -> str:
    if entry.get("global_layer") is None:
        return dotted
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "layers" and parts[i].isdigit():
            parts[i] = str(entry["global_layer"])
            break
    return ".".join(parts)


def ms_rank(tp: int, pp: int, tp_size: int, dp_size: int, cp_size: int, dp: int = 0, cp: int = 0) -> int:
    return pp * dp_size * cp_size * tp_size + dp * cp_size * tp_size + cp * tp_size + tp


def expected_tensors(record: Record, *, tp_size: int, dp_size: int = 1, cp_size: int = 1,
                     states=("param", "exp_avg", "exp_avg_sq"), param_only: bool = False,
                     style: str = "mindspeed") -> dict[int, dict]:
    """rank -> {MindSpore name: fp32 array} for the dp=cp=0 ranks (tensors only, no scalars)."""
    out: dict[int, dict] = {}
    for entry in record.params:
        rank = ms_rank(entry["tp"], entry["pp"], tp_size, dp_size, cp_size)
        tensors = out.setdefault(rank, {})
        key = f"{entry['key']}::"
        if param_only:
            name = ms_name(with_global_layer(state_key(entry), entry), record.meta, style)
            tensors[name] = record.tensors[key + "model_bf16"].float().numpy()
            continue
        if not entry.get("requires_grad", True):
            continue
        name = ms_name(entry["name_global_layer"], record.meta, style)
        for state in states:
            full = name if state == "param" else f"{state}.{name}"
            tensors[full] = record.tensors[key + state].float().numpy()
    return out


def load_trusted(path: Path):
    """torch.load of test data with the fixture generator's own allow-list, independent of the
    converter's."""
    from tests.megatron_fixture import load_megatron_file
    return load_megatron_file(path)


def expected_scalars(model_file: Path) -> dict[str, np.ndarray]:
    """The extra scalars the output format specifies, from the rank's own model_optim_rng.pt."""
    sd = load_trusted(model_file)
    out = {"step_num": np.array(sd["iteration"], np.int64), "epoch_num": np.array(0, np.int64)}
    # a MoE run's ChainedOptimizer saves [dense, experts]; their groups are numbered on in that order
    optimizers = sd["optimizer"] if isinstance(sd["optimizer"], list) else [sd["optimizer"]]
    for i, group in enumerate(g for o in optimizers for g in o["optimizer"]["param_groups"]):
        for k, v in group.items():
            if not isinstance(v, (int, float)) or k == "params":
                continue
            if k == "step":
                out["state_step"] = np.array([v], np.float32)
            else:
                out["learning_rate_group_%d" % i if k == "lr" else f"{k}_group_{i}"] = np.array(v, np.float32)
    for k, v in sd["opt_param_scheduler"].items():
        if k == "lr_decay_style":
            out[k] = np.array(_LR_STYLES.index(v), np.int64)
        elif k == "wd_incr_style":
            out[k] = np.array(_WD_STYLES.index(v), np.int64)
        elif k in ("max_lr", "min_lr", "start_wd", "end_wd"):
            out[k] = np.array(v, np.float64)
        elif k in ("lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps"):
            out[k] = np.array(v, np.int64)
        elif isinstance(v, (int, float)):
            out[k] = np.array(v, np.float32)
    return out


def run_cli(*args, env_extra=None, timeout=600, preexec_fn=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the converter as users do: a subprocess with its log on stdout (relative paths in `args`
    are relative to `cwd`)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=preexec_fn, cwd=cwd)


def load_ms(path: Path, fmt: str = "ckpt") -> dict[str, np.ndarray]:
    import mindspore as ms
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path), format=fmt).items()}


def assert_rank_files_match(ms_path: Path, expected: dict[int, dict], *, fmt: str = "ckpt",
                            prefix: str = "network", scalars: dict[int, dict] | None = None) -> int:
    """Every expected tensor equal element by element (bitwise), no tensor missing or extra.
    Returns the number of tensors compared."""
    compared = 0
    for rank, tensors in sorted(expected.items()):
        loaded = load_ms(Path(ms_path) / f"rank_{rank}" / f"{prefix}.{fmt}", fmt)
        want_names = set(tensors) | set((scalars or {}).get(rank, {}))
        if scalars is not None:
            assert set(loaded) == want_names, (rank, sorted(set(loaded) ^ want_names)[:10])
        else:
            missing = set(tensors) - set(loaded)
            assert not missing, (rank, sorted(missing)[:10])
        for name, want in {**tensors, **(scalars or {}).get(rank, {})}.items():
            got = loaded[name]
            assert got.dtype == want.dtype and got.shape == want.shape, (rank, name, got.dtype, got.shape,
                                                                         want.dtype, want.shape)
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (rank, name)
            compared += 1
    return compared
