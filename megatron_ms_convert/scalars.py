"""The numbers that are not tensors, both ways: how Megatron's iteration, optimizer param-group
values and LR-scheduler state are stored in a MindSpore file (name, shape, dtype, encoding) and how
a stored value is read back into the type Megatron saved. One table, as `naming` is for tensor
names: `encode_*` is used by the forward planner, `decode_*` by the way back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConvertInputError

STEP_NUM, EPOCH_NUM = "step_num", "epoch_num"  # int64 scalars; the iteration, and 0
STATE_STEP = "state_step"  # one step counter for all param groups, as MindSpore's optimizer keeps it
SCHEDULER_STYLES = {"lr_decay_style": ("constant", "WSD", "linear", "cosine", "inverse-square-root"),
                    "wd_incr_style": ("constant", "linear", "cosine")}  # stored as int64 indices into these
SCHEDULER_FLOAT64 = frozenset({"max_lr", "min_lr", "start_wd", "end_wd"})
SCHEDULER_INT64 = frozenset({"lr_warmup_steps", "num_steps", "lr_decay_steps", "wd_incr_steps"})


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool included: MindSpore keeps flags as 0.0/1.0


def group_scalar(i: int, key: str) -> tuple[str, tuple[int, ...]]:
    """(MindSpore name, shape) of key `key` of optimizer param group `i` (stored as float32).

    >>> group_scalar(0, "step"), group_scalar(1, "lr"), group_scalar(1, "weight_decay")
    (('state_step', (1,)), ('learning_rate_group_1', ()), ('weight_decay_group_1', ()))
    """
    if key == "step":
        return STATE_STEP, (1,)
    return (f"learning_rate_group_{i}" if key == "lr" else f"{key}_group_{i}"), ()


def scheduler_dtype(key: str, value: Any) -> str | None:
    """The dtype opt_param_scheduler entry `key` is stored with; None when it is not stored."""
    if key in SCHEDULER_STYLES:
        return "int64"
    if not is_number(value):
        return None
    return "float64" if key in SCHEDULER_FLOAT64 else "int64" if key in SCHEDULER_INT64 else "float32"


def encode_scheduler(key: str, value: Any, where: Any) -> int | float:
    """The stored value of a scheduler entry whose scheduler_dtype is not None."""
    if key in SCHEDULER_STYLES:
        if value not in SCHEDULER_STYLES[key]:
            raise ConvertInputError(f"{where}: opt_param_scheduler {key} is {value!r}",
                                    expected=f"one of {list(SCHEDULER_STYLES[key])}", found=repr(value),
                                    fix="this style has no MindSpore equivalent; convert with a supported one")
        return SCHEDULER_STYLES[key].index(value)
    return int(value) if scheduler_dtype(key, value) == "int64" else float(value)


def decode_number(saved: Any, stored: float | int) -> Any:
    """The value to restore for a number MindSpore stores with less precision (float32) than Megatron
    saved it (a Python float or int): the saved value when MindSpore's equals it rounded to float32
    (training did not change it), else MindSpore's, in the saved value's type."""
    if isinstance(saved, bool):
        return saved if float(saved) == stored else bool(stored)
    if isinstance(saved, (int, float)) and float(np.float32(saved)) == float(np.float32(stored)):
        return saved
    if isinstance(saved, int):
        return int(round(stored))
    return float(stored)


def decode_scheduler(key: str, stored: float | int, saved: Any, where: Any) -> Any:
    """The scheduler entry to restore from its stored value; None when the entry is not a stored one."""
    if key in SCHEDULER_STYLES:
        styles = SCHEDULER_STYLES[key]
        if not 0 <= int(stored) < len(styles):
            raise ConvertInputError(f"{where}: {key} is {stored}", expected=f"an index into {list(styles)}",
                                    fix="re-copy the file (damaged?)")
        return styles[int(stored)]
    if key in SCHEDULER_INT64:
        return int(stored)
    if key in SCHEDULER_FLOAT64:
        return float(stored)
    return decode_number(saved, stored) if is_number(saved) else None
