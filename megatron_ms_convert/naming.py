"""Megatron <-> MindSpore parameter names."""

from __future__ import annotations

from typing import Callable, Sequence

RENAMES = {
    "self_attention": "attention",
    "query_key_value": "qkv_proj",
    "dense": "out_proj",
    "dense_h_to_4h": "mapping",
    "dense_4h_to_h": "projection",
}

def ms_param_name(source_name: str, layer_map: Callable[[int], int], state: str = "param") -> str:
    """MindSpore name of a Megatron parameter: drop `module` components, rename the legacy module names,
    make the number after `layers` global, and prefix optimizer moments with their state name."""
    parts = [p for p in source_name.split(".") if p != "module"]
    out = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "layers" and part.isdigit():
            out.append(str(layer_map(int(part))))
        else:
            out.append(RENAMES.get(part, part))
    name = ".".join(out)
    return name if state == "param" else f"{state}.{name}"


def local_layer_numbers(keys: Sequence[str]) -> set[int]:
    numbers = set()
    for key in keys:
        parts = key.split(".")
        for before, part in zip(parts, parts[1:]):
            if before == "layers" and part.isdigit():
                numbers.add(int(part))
    return numbers


