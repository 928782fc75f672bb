"""The optimizer param_groups of one rank as Megatron core_r0.6.0 builds them, for both directions of
a re-shard: the way there numbers the MindSpore scalars `learning_rate_group_i` / `weight_decay_group_i`
by them, the way back writes them into model_optim_rng.pt.

`_get_param_groups` (megatron/core/optimizer/__init__.py) keys every parameter by (wd_mult,
lr_mult, is_expert_parallel, is_decoupled_lr) -- no weight decay for biases and 1-D parameters,
expert-parallel for parameters with `allreduce=False`, decoupled lr for the parameters marked as
embedding or output when --decoupled-lr is set -- and makes one group per key, in order of first
appearance over the rank's chunks. The order is the rank's own: a stage starting with a norm has its
groups the other way round from a stage starting with a matrix, and a checkpoint's group i overwrites
group i of the run that loads it (RESHARDING.md §6 pitfall 2). So a target rank's groups are built in
its own order from per-kind templates of the recorded groups, never copied from another rank. At
ep > 1 `get_megatron_optimizer` gives the expert-parallel groups an optimizer of their own: a MoE run
numbers the dense optimizer's groups first, then the experts' (`split_by_optimizer`).

MindSpeed-Core-MS (read at 697e48e) keys its groups by (wd_mult, lr_mult) only, at every ep, in
order of first appearance over the rank's parameters, experts among them, in one optimizer: so a
re-sharded MindSpore rank numbers `mindspeed_param_groups`, whose kinds are `mindspeed_key`'s.

    >>> matrix, norm = group_key(no_weight_decay=False), group_key(no_weight_decay=True)
    >>> templates = group_templates([{"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False,
    ...                               "weight_decay": 0.1, "params": [0, 1]},
    ...                              {"wd_mult": 0.0, "lr_mult": 1.0, "is_expert_parallel": False,
    ...                               "weight_decay": 0.0, "params": [2]}], "rank 0")
    >>> [g["weight_decay"] for g in rank_param_groups([norm, matrix, norm], templates)]  # a later stage
    [0.0, 0.1]
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

from ..errors import ConvertInputError

GROUP_KEY_FIELDS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
GroupKey = tuple[float, float, bool, bool]


def no_weight_decay(name: str, shape: Sequence[int]) -> bool:
    """Megatron's default rule: biases and 1-D parameters (norms) get no weight decay."""
    return name.endswith(".bias") or len(shape) == 1


def group_key(*, no_weight_decay: bool, expert_parallel: bool = False, decoupled_lr: bool = False) -> GroupKey:
    """A parameter's group key (pretrain_gpt gives no lr scaling rule: lr_mult is always 1)."""
    return (0.0 if no_weight_decay else 1.0, 1.0, bool(expert_parallel), bool(decoupled_lr))


def recorded_group_key(group: dict) -> GroupKey:
    """The key of a group as a checkpoint saves it (older saves lack is_decoupled_lr)."""
    return (float(group["wd_mult"]), float(group["lr_mult"]), bool(group["is_expert_parallel"]),
            bool(group.get("is_decoupled_lr", False)))


def is_keyed(groups: Iterable[dict]) -> bool:
    """Whether saved groups carry their key (r0.6.0 saves do; an older format's do not)."""
    return all("wd_mult" in g and "lr_mult" in g for g in groups)


def group_templates(recorded: Iterable[dict], where: str) -> dict[GroupKey, dict]:
    """Saved param_groups (any ranks', any order) keyed by kind, without `params`; two of one kind
    must agree: only their order differs between ranks."""
    out: dict[GroupKey, dict] = {}
    for group in recorded:
        key = recorded_group_key(group)
        body = {k: v for k, v in group.items() if k != "params"}
        if key in out and out[key] != body:
            raise ConvertInputError(f"{where}: two recorded param_groups of kind {_kind(key)} differ",
                                    expected="equal hyper-parameters per kind on every rank",
                                    found=f"{out[key]} and {body}", fix="check that the inputs are of one run")
        out.setdefault(key, body)
    return out


def group_order(keys: Iterable[GroupKey]) -> list[GroupKey]:
    """The distinct keys of a rank's parameters (given in model order, chunk after chunk) in order of
    first appearance: the order of its groups."""
    return list(dict.fromkeys(keys))


def rank_param_groups(keys: Iterable[GroupKey], templates: dict[GroupKey, dict], where: str = "") -> list[dict]:
    """One rank's param_groups, from its parameters' keys in model order: one group per key in order
    of first appearance, each a copy of the template of its kind. A kind the recorded run never had
    (expert-parallel groups when it ran at ep 1) takes the hyper-parameters of the same kind's
    other-parallelism group."""
    out = []
    for key in group_order(keys):
        template = templates.get(key)
        if template is None:
            template = templates.get((key[0], key[1], not key[2], key[3]))
            if template is not None:
                template = {**template, "is_expert_parallel": key[2]}
        if template is None:
            raise ConvertInputError(f"{where}: no recorded param_group of kind {_kind(key)}",
                                    expected="a recorded group of every kind the target rank has",
                                    found=f"kinds {[_kind(k) for k in templates]}",
                                    fix="pass the records of the whole run (every rank's groups are read), or "
                                        "convert at the recorded layout")
        out.append(copy.deepcopy(template))
    return out


def mindspeed_key(key: GroupKey) -> GroupKey:
    """The kind of MindSpeed-Core-MS group that holds a parameter of Megatron kind `key`: its
    `set_weight_decay` (mindspeed_ms/training/utils.py:29-67) keys by (wd_mult, lr_mult) alone, so an
    expert sits in the dense group of its weight-decay kind whatever the ep, as in Megatron at ep 1."""
    return (key[0], key[1], False, key[3])


def mindspeed_param_groups(keys: Iterable[GroupKey], templates: dict[GroupKey, dict], where: str = "") -> list[dict]:
    """One MindSpore rank's param groups as MindSpeed-Core-MS builds them, from its parameters'
    Megatron keys in model order: one group per `mindspeed_key` in order of first appearance (its
    `set_weight_decay` fills a dict in parameter order; MindSpore names group i's scalars
    `learning_rate_group_i` / `weight_decay_group_i`), each a copy of the recorded dense group of its
    kind (a Megatron run's expert groups carry the same hyper-parameters)."""
    return rank_param_groups((mindspeed_key(key) for key in keys), templates, where)


def kind_values(by_kind: dict[GroupKey, dict], key: GroupKey) -> dict:
    """The values read back for a Megatron group of kind `key`: its own kind's when a file numbered
    it (a conversion at the training layout), else those of the MindSpeed group that held its
    parameters (`mindspeed_key`)."""
    return by_kind.get(key) or by_kind.get(mindspeed_key(key), {})


def split_by_optimizer(groups: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(the dense optimizer's groups, the expert optimizer's), each in the rank's order: how
    get_megatron_optimizer filters the rank's groups by is_expert_parallel."""
    return [g for g in groups if not g["is_expert_parallel"]], [g for g in groups if g["is_expert_parallel"]]


def _kind(key: GroupKey) -> dict:
    return dict(zip(GROUP_KEY_FIELDS, key))
