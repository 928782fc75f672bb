"""Megatron <-> MindSpore parameter names: one table, read in both directions.

The consumer is MindSpeed-Core-MS's MindSpore GPTModel (its legacy model, the only one it has). Its
loader only warns about names it does not know, so a name that is merely close is a parameter that
silently keeps its initial value; the table therefore lists every name that model has, for both
Megatron model families, and a name it does not list is an error rather than a guess.

`NAME_RULES` is the table. Each rule pairs a Megatron name (model-relative, as `named_parameters()`
gives it without `module.` components, or the key `state_dict_for_save_checkpoint` uses) with the
MindSpore name. Placeholders: `<i>` a global layer number, `<e>` a local expert index (MoE; the same
on both sides), `<wb>` `weight` or `bias` kept as is, `<norm>` a norm's `weight`/`bias`, which the
MindSpore side spells by its norm class (`NORM_PARAMS`).

Expert parameters keep their local index in names; MindSpeed-Core-MS's checkpoints hold a rank's local
experts stacked under the name of local expert 0 (`stacked_expert_name`), which the plan builds.

`mindspore_name` goes there; `megatron_name` comes back and also reads the names the documented tool
writes (`--name-style documented`), which drop `module`, rename a few legacy components
(`DOCUMENTED_RENAMES`) and keep everything else.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import ConvertInputError

STYLES = ("mindspeed", "documented")
FAMILIES = ("legacy", "mcore")
MOMENT_STATES = ("exp_avg", "exp_avg_sq")

# How MindSpeed-Core-MS spells a norm's parameters: its LayerNorm holds gamma/beta, its RMSNorm weight.
NORM_PARAMS = {
    "LayerNorm": {"weight": "gamma", "bias": "beta"},
    "RMSNorm": {"weight": "weight"},
}

_LEGACY_LAYER = "language_model.encoder.layers.<i>."
_MCORE_LAYER = "decoder.layers.<i>."
_MS_LAYER = "language_model.encoder.layers.<i>."


@dataclass(frozen=True)
class NameRule:
    """Megatron name pattern <-> MindSpore name pattern. `only_if` limits the rule, when reading
    MindSpore names back, to runs with that property ("tied", "untied", "te" or "local" norms)."""

    family: str
    megatron: str
    mindspore: str
    only_if: str = ""


NAME_RULES: tuple[NameRule, ...] = (
    # legacy megatron.legacy.model.GPTModel
    NameRule("legacy", "language_model.embedding.word_embeddings.weight",
             "language_model.embedding.word_embeddings.weight"),
    NameRule("legacy", "language_model.embedding.position_embeddings.weight",
             "language_model.embedding.position_embeddings.embedding_table"),
    NameRule("legacy", _LEGACY_LAYER + "input_norm.<norm>", _MS_LAYER + "input_norm.<norm>"),
    NameRule("legacy", _LEGACY_LAYER + "self_attention.query_key_value.<wb>", _MS_LAYER + "attention.qkv_proj.<wb>"),
    NameRule("legacy", _LEGACY_LAYER + "self_attention.dense.<wb>", _MS_LAYER + "attention.out_proj.<wb>"),
    NameRule("legacy", _LEGACY_LAYER + "post_attention_norm.<norm>", _MS_LAYER + "post_attention_norm.<norm>"),
    NameRule("legacy", _LEGACY_LAYER + "mlp.dense_h_to_4h.<wb>", _MS_LAYER + "mlp.mapping.<wb>"),
    NameRule("legacy", _LEGACY_LAYER + "mlp.dense_4h_to_h.<wb>", _MS_LAYER + "mlp.projection.<wb>"),
    NameRule("legacy", "language_model.encoder.final_norm.<norm>", "language_model.encoder.final_norm.<norm>"),
    NameRule("legacy", "language_model.output_layer.weight", "language_model.output_layer.weight", "untied"),
    # the last pipeline stage's copy of tied embeddings: named_parameters() name, then state-dict key
    NameRule("legacy", "word_embeddings.weight", "language_model.output_layer.weight", "tied"),
    NameRule("legacy", "word_embeddings_for_head.weight", "language_model.output_layer.weight", "never"),
    # megatron.core GPTModel (local or Transformer Engine layer spec)
    NameRule("mcore", "embedding.word_embeddings.weight", "language_model.embedding.word_embeddings.weight"),
    NameRule("mcore", "embedding.position_embeddings.weight",
             "language_model.embedding.position_embeddings.embedding_table"),
    NameRule("mcore", _MCORE_LAYER + "input_layernorm.<norm>", _MS_LAYER + "input_norm.<norm>", "local"),
    NameRule("mcore", _MCORE_LAYER + "self_attention.linear_qkv.layer_norm_<norm>", _MS_LAYER + "input_norm.<norm>",
             "te"),
    NameRule("mcore", _MCORE_LAYER + "self_attention.linear_qkv.<wb>", _MS_LAYER + "attention.qkv_proj.<wb>"),
    NameRule("mcore", _MCORE_LAYER + "self_attention.linear_proj.<wb>", _MS_LAYER + "attention.out_proj.<wb>"),
    NameRule("mcore", _MCORE_LAYER + "pre_mlp_layernorm.<norm>", _MS_LAYER + "post_attention_norm.<norm>", "local"),
    NameRule("mcore", _MCORE_LAYER + "mlp.linear_fc1.layer_norm_<norm>", _MS_LAYER + "post_attention_norm.<norm>",
             "te"),
    NameRule("mcore", _MCORE_LAYER + "mlp.linear_fc1.<wb>", _MS_LAYER + "mlp.mapping.<wb>"),
    NameRule("mcore", _MCORE_LAYER + "mlp.linear_fc2.<wb>", _MS_LAYER + "mlp.projection.<wb>"),
    # MoE (SequentialMLP experts; the router has no bias on either side)
    NameRule("mcore", _MCORE_LAYER + "mlp.router.weight", _MS_LAYER + "mlp.router.gating.weight"),
    NameRule("mcore", _MCORE_LAYER + "mlp.experts.local_experts.<e>.linear_fc1.<wb>",
             _MS_LAYER + "mlp.experts.local_experts.<e>.mapping.<wb>"),
    NameRule("mcore", _MCORE_LAYER + "mlp.experts.local_experts.<e>.linear_fc2.<wb>",
             _MS_LAYER + "mlp.experts.local_experts.<e>.projection.<wb>"),
    NameRule("mcore", "decoder.final_layernorm.<norm>", "language_model.encoder.final_norm.<norm>"),
    NameRule("mcore", "output_layer.weight", "language_model.output_layer.weight"),
)

# What the documented tool renames (whole dotted components); everything else it keeps.
DOCUMENTED_RENAMES = {
    "self_attention": "attention",
    "query_key_value": "qkv_proj",
    "dense": "out_proj",
    "dense_h_to_4h": "mapping",
    "dense_4h_to_h": "projection",
}
_DOCUMENTED_BACK = {v: k for k, v in DOCUMENTED_RENAMES.items()}


@dataclass(frozen=True)
class NamingFacts:
    """What the names depend on, all known from the training run's saved args."""

    family: str = "legacy"  # "legacy" (megatron.legacy.model) or "mcore" (megatron.core)
    normalization: str = "LayerNorm"  # args.normalization
    tied: bool = True  # not args.untie_embeddings_and_output_weights
    te_norms: bool = False  # mcore with Transformer Engine's spec: norms fused into linear_qkv / linear_fc1
    style: str = "mindspeed"  # "mindspeed" (the MindSpore model's names) or "documented"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES or self.style not in STYLES:
            raise ValueError(f"NamingFacts: family {self.family!r} / style {self.style!r}")


def naming_facts(args: Any, style: str = "mindspeed", keys: Sequence[str] = ()) -> NamingFacts:
    """The facts of a run from its saved args (argparse.Namespace; what they lack takes core_r0.6.0's
    defaults). Args without `use_mcore_models` leave the model family to the parameter names `keys`."""
    if hasattr(args, "use_mcore_models"):
        mcore = bool(args.use_mcore_models)
    else:
        mcore = any(model_relative(k).startswith(("decoder.", "embedding.", "output_layer.")) for k in keys)
    return NamingFacts(
        family="mcore" if mcore else "legacy",
        normalization=getattr(args, "normalization", None) or "LayerNorm",
        tied=not getattr(args, "untie_embeddings_and_output_weights", False),
        # Megatron's pretrain_gpt.py builds the Transformer Engine spec for this impl, its default
        te_norms=mcore and getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine",
        style=style)


# ---------------------------------------------------------------------------------------------
# Layer numbers


def renumber_layers(name: str, layer_map: Callable[[int], int]) -> str:
    """`name` with the number after its `layers` component replaced by layer_map(number)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "layers" and parts[i].isdigit():
            parts[i] = str(layer_map(int(parts[i])))
    return ".".join(parts)


def local_layer_numbers(keys: Sequence[str]) -> set[int]:
    numbers = set()
    for key in keys:
        parts = key.split(".")
        for before, part in zip(parts, parts[1:]):
            if before == "layers" and part.isdigit():
                numbers.add(int(part))
    return numbers


# ---------------------------------------------------------------------------------------------
# Experts


def is_expert_key(name: str) -> bool:
    """Whether a Megatron parameter belongs to the experts (expert-parallel: its own grad buffers and
    optimizer) rather than to the dense model; the router is dense."""
    parts = name.split(".")
    return "experts" in parts or "local_experts" in parts


def local_expert_index(name: str) -> int | None:
    """The number after a `local_experts` component (a rank-local expert index), None without one."""
    parts = name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before == "local_experts" and part.isdigit():
            return int(part)
    return None


def stacked_expert_name(name: str) -> str:
    """The name MindSpeed-Core-MS stores a rank's local experts under, stacked on a new axis 0: that
    of local expert 0.

    >>> stacked_expert_name("exp_avg.x.layers.3.mlp.experts.local_experts.5.mapping.weight")
    'exp_avg.x.layers.3.mlp.experts.local_experts.0.mapping.weight'
    """
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] == "local_experts" and parts[i].isdigit():
            parts[i] = "0"
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------
# Patterns


@functools.lru_cache(maxsize=None)  # a few dozen (template, norm spelling) pairs; names repeat per layer
def _pattern(template: str, norm_values: tuple[str, ...]) -> re.Pattern:
    regex = re.escape(template)
    regex = regex.replace(re.escape("<i>"), r"(?P<i>\d+)")
    regex = regex.replace(re.escape("<e>"), r"(?P<e>\d+)")
    regex = regex.replace(re.escape("<wb>"), r"(?P<wb>weight|bias)")
    regex = regex.replace(re.escape("<norm>"), "(?P<norm>" + "|".join(map(re.escape, norm_values)) + ")")
    return re.compile(regex + r"\Z")


def _fill(template: str, i: str | None, wb: str | None, norm: str | None, e: str | None = None) -> str:
    out = template
    for key, value in (("<i>", i), ("<e>", e), ("<wb>", wb), ("<norm>", norm)):
        if key in out:
            out = out.replace(key, value)
    return out


def _translate(name: str, pairs: Sequence[tuple[str, str]], norms: dict[str, str]) -> str | None:
    """`name` matched against the first template of each (from, to) pair of the name table, filled into
    the second; `norms` maps the norm parameter spellings of the one side to the other's. None when
    no template matches. Both directions read the table through here."""
    for source, target in pairs:
        match = _pattern(source, tuple(norms)).match(name)
        if match:
            found = match.groupdict()
            norm = norms[found["norm"]] if found.get("norm") else None
            return _fill(target, found.get("i"), found.get("wb"), norm, found.get("e"))
    return None


def _norm_table(normalization: str, where: str) -> dict[str, str]:
    if normalization not in NORM_PARAMS:
        raise ConvertInputError(f"{where}: normalization {normalization!r}", expected=f"one of {list(NORM_PARAMS)}",
                                found=repr(normalization),
                                fix="MindSpeed-Core-MS has no such norm; pass --name-style documented to write "
                                    "the documented tool's names")
    return NORM_PARAMS[normalization]


def rule_applies(rule: NameRule, facts: NamingFacts) -> bool:
    """Whether reading MindSpore names back may produce this rule's Megatron name."""
    return rule.family == facts.family and {
        "": True, "never": False, "tied": facts.tied, "untied": not facts.tied,
        "te": facts.te_norms, "local": not facts.te_norms}[rule.only_if]


# ---------------------------------------------------------------------------------------------
# Megatron -> MindSpore


def model_relative(name: str) -> str:
    """The name without `module` components (Float16Module / DDP wrappers)."""
    return ".".join(p for p in name.split(".") if p != "module")


def documented_name(name: str) -> str:
    """The documented tool's name of a model-relative Megatron name (layer numbers as given)."""
    return ".".join(DOCUMENTED_RENAMES.get(p, p) for p in name.split("."))


def mindspeed_name(name: str, facts: NamingFacts, where: str = "") -> str:
    """The MindSpore model's name of a model-relative Megatron name (layer numbers as given)."""
    norms = _norm_table(facts.normalization, where or name)
    # every rule of the family: the conditions of rule_applies only pick among Megatron names that
    # share one MindSpore name when reading back
    found = _translate(name, [(r.megatron, r.mindspore) for r in NAME_RULES if r.family == facts.family], norms)
    if found is not None:
        return found
    raise ConvertInputError(
        f"{where + ': ' if where else ''}parameter {name}",
        expected=f"a parameter of a {facts.family} GPT model with {facts.normalization} that MindSpeed-Core-MS's "
                 "GPTModel has (see docs/names.md)",
        found=name,
        fix="this parameter would not load into the MindSpore model; pass --name-style documented to write "
            "the documented tool's names anyway")


def mindspore_name(megatron: str, facts: NamingFacts, layer_map: Callable[[int], int] = lambda i: i,
                   state: str = "param", where: str = "") -> str:
    """MindSpore name of a Megatron parameter (a DDP/param_map name or a model state-dict key, with
    local layer numbers), of optimizer state `state` ("param", "exp_avg" or "exp_avg_sq")."""
    name = renumber_layers(model_relative(megatron), layer_map)
    out = documented_name(name) if facts.style == "documented" else mindspeed_name(name, facts, where)
    return out if state == "param" else f"{state}.{out}"


# ---------------------------------------------------------------------------------------------
# MindSpore -> Megatron


def split_state(ms_name: str) -> tuple[str, str]:
    """("exp_avg" | "exp_avg_sq" | "param", the parameter's name) of a MindSpore tensor name."""
    for state in MOMENT_STATES:
        if ms_name.startswith(state + "."):
            return state, ms_name[len(state) + 1:]
    return "param", ms_name


def _from_mindspeed(name: str, facts: NamingFacts) -> str | None:
    back = {ms: mg for mg, ms in _norm_table(facts.normalization, name).items()}
    return _translate(name, [(r.mindspore, r.megatron) for r in NAME_RULES if rule_applies(r, facts)], back)


def _from_documented(name: str, facts: NamingFacts) -> str | None:
    """The Megatron name the documented tool wrote `name` for, if it is one of the table's."""
    candidate = ".".join(_DOCUMENTED_BACK.get(p, p) for p in name.split("."))
    if facts.family == "legacy" and candidate == "word_embeddings_for_head.weight":
        candidate = "word_embeddings.weight"  # --convert-param-only wrote the state-dict key
    norms = tuple(_norm_table(facts.normalization, name))
    known = any(rule_applies(rule, facts) and _pattern(rule.megatron, norms).match(candidate)
                for rule in NAME_RULES)
    return candidate if known else None


def megatron_name(ms_name: str, facts: NamingFacts, where: str = "") -> tuple[str, str]:
    """(state, Megatron model-relative name with global layer numbers) of a MindSpore tensor name,
    written in either style. The Megatron name is the `named_parameters()` name (the legacy tied head is
    `word_embeddings.weight`; `megatron_state_dict_key` gives its key in model_optim_rng.pt)."""
    state, name = split_state(ms_name)
    found = _from_mindspeed(name, facts) or _from_documented(name, facts)
    if found is None:
        raise ConvertInputError(
            f"{where + ': ' if where else ''}tensor {ms_name}",
            expected=f"a parameter name of a {facts.family} GPT model with {facts.normalization} "
                     f"({'tied' if facts.tied else 'untied'} embeddings), in MindSpeed-Core-MS's or the "
                     "documented tool's spelling (see docs/names.md)",
            found=ms_name, fix="check that the checkpoint belongs to this training run's args")
    return state, found


def megatron_state_dict_key(name: str, facts: NamingFacts) -> str:
    """Where a model-relative Megatron parameter sits in model_optim_rng.pt's flattened model dict:
    legacy GPTModel saves its last stage's copy of tied embeddings as `word_embeddings_for_head`."""
    if facts.family == "legacy" and name == "word_embeddings.weight":
        return "word_embeddings_for_head.weight"
    return name


def is_parameter_name(ms_name: str, facts: NamingFacts) -> bool:
    """Whether a MindSpore tensor name is a model parameter or moment (not a scalar like step_num)."""
    _, name = split_state(ms_name)
    return _from_mindspeed(name, facts) is not None or _from_documented(name, facts) is not None
