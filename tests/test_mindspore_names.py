"""The converter's names against the MindSpore model's own (tests/mindspeed_model_facts.py), and the
name table read both ways. Planning-level checks over many fixture layouts (no files written), plus
end-to-end runs for what only a real output shows (the flag, the warning, the errors)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.naming import (NAME_RULES, NamingFacts, is_parameter_name, megatron_name, rule_applies,
                                        megatron_state_dict_key, mindspore_name, model_relative, naming_facts,
                                        renumber_layers)
from tests.expected_outputs import (assert_rank_files_match, documented_name, expected_scalars, expected_tensors,
                                    load_ms, load_record, run_cli)
from tests.megatron_fixture import FixtureSpec, _make_args, plan_fixture, write_fixture
from tests.mindspeed_model_facts import MindSpeedStage, check_rank_names, param_names, rank_names, stages_of

SMALL = dict(hidden=8, ffn=16, heads=2, vocab=11)


def _specs() -> dict[str, FixtureSpec]:
    """Every combination of family / layer spec, norm, position embedding, ties and pipeline shape."""
    shapes = {"tp1_pp1": dict(num_layers=2), "tp2_pp2": dict(tp=2, pp=2, num_layers=4),
              "pp3_vpp2": dict(pp=3, vpp=2, num_layers=6), "pp2_uneven": dict(pp=2, num_layers=3, stage_list=(2, 1))}
    families = {"legacy": dict(model="legacy"), "mcore_local": dict(model="mcore"),
                "mcore_te": dict(model="mcore", mcore_spec="te")}
    out = {}
    for (shape, s), (family, f), norm, pos, untie in itertools.product(
            shapes.items(), families.items(), ("LayerNorm", "RMSNorm"), ("learned_absolute", "rope"), (False, True)):
        if family == "mcore_local" and norm == "RMSNorm":
            continue  # FusedLayerNorm is LayerNorm only
        name = f"{family}_{shape}_{norm}_{pos}_{'untied' if untie else 'tied'}"
        out[name] = FixtureSpec(**s, **f, **SMALL, normalization=norm, position_embedding=pos,
                                untie_embeddings=untie)
    return out


SPECS = _specs()


def _meta(spec: FixtureSpec) -> dict:
    return {"model": spec.model, "pp": spec.pp, "vpp": spec.vpp, "num_layers": spec.num_layers,
            "stage_list": list(spec.stage_list) if spec.stage_list else None, "normalization": spec.normalization,
            "position_embedding": spec.position_embedding, "untie_embeddings": spec.untie_embeddings}


def _facts(spec: FixtureSpec, style: str = "mindspeed") -> NamingFacts:
    return naming_facts(_make_args(spec, Path("/save"), 0, 0), style)


def _converter_names(spec: FixtureSpec, *, param_only: bool, style: str = "mindspeed"):
    """(tp, pp) -> {MindSpore name: (global model-relative Megatron name, global state-dict key)} as
    the converter names the fixture's parameters."""
    facts = _facts(spec, style)
    out = {}
    for rank in plan_fixture(spec).ranks:
        names = out.setdefault((rank.tp, rank.pp), {})
        for chunk in rank.chunks:
            def to_global(i: int, offset=chunk.layer_offset) -> int:
                return i + offset  # the fixture's own numbering, not the converter's topology

            for p in chunk.params:
                source = p.state_dict_key if param_only else p.ddp_name
                ms = mindspore_name(source, facts, to_global)
                names[ms] = (renumber_layers(model_relative(p.ddp_name), to_global),
                             renumber_layers(p.state_dict_key, to_global))
    return out


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("param_only", [False, True], ids=["full", "param_only"])
def test_every_stage_gets_exactly_the_mindspore_models_names(name, param_only):
    spec = SPECS[name]
    for (tp, pp), names in _converter_names(spec, param_only=param_only).items():
        want = rank_names(stages_of(_meta(spec), pp), states=("param",))
        assert set(names) == want, (tp, pp, sorted(set(names) ^ want))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("style", ["mindspeed", "documented"])
def test_names_read_back_to_the_megatron_names(name, style):
    """Round trip over every name the fixture writes: MindSpore name -> Megatron name gives the
    parameter back, for both styles and every optimizer state; the way back reads either style."""
    spec = SPECS[name]
    back = _facts(spec)  # the way back knows the family and norm, not the style
    for param_only in (False, True):
        for (tp, pp), names in _converter_names(spec, param_only=param_only, style=style).items():
            for ms, (megatron, state_dict_key) in names.items():
                for state in ("param", "exp_avg", "exp_avg_sq"):
                    full = ms if state == "param" else f"{state}.{ms}"
                    assert megatron_name(full, back) == (state, megatron), (style, full)
                    assert is_parameter_name(full, back)
                assert megatron_state_dict_key(megatron, back) == state_dict_key


def test_documented_style_is_the_documented_tools_names():
    spec = SPECS["legacy_tp2_pp2_LayerNorm_learned_absolute_tied"]
    for param_only in (False, True):
        names = _converter_names(spec, param_only=param_only, style="documented")
        for (tp, pp), by_ms in names.items():
            rank = next(r for r in plan_fixture(spec).ranks if (r.tp, r.pp) == (tp, pp))
            want = {documented_name(renumber_layers(p.state_dict_key if param_only else p.ddp_name,
                                                    lambda i: i + c.layer_offset))
                    for c in rank.chunks for p in c.params}
            assert set(by_ms) == want


_LAYER0 = "language_model.encoder.layers.0."


@pytest.mark.parametrize("name, norm, want", [
    ("language_model.encoder.layers.0.input_norm.weight", "LayerNorm", _LAYER0 + "input_norm.gamma"),
    ("language_model.encoder.layers.0.input_norm.bias", "LayerNorm", _LAYER0 + "input_norm.beta"),
    ("language_model.encoder.layers.0.input_norm.weight", "RMSNorm", _LAYER0 + "input_norm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_bias", "LayerNorm",
     _LAYER0 + "post_attention_norm.beta"),
])
def test_norm_spelling_follows_the_runs_normalization(name, norm, want):
    family = "mcore" if name.startswith("decoder") else "legacy"
    assert mindspore_name(name, NamingFacts(family=family, normalization=norm)) == want


def test_unknown_names_stop_the_conversion_rather_than_load_nowhere():
    facts = NamingFacts(family="mcore", normalization="LayerNorm")
    with pytest.raises(ConvertInputError, match="--name-style documented"):
        mindspore_name("decoder.layers.0.self_attention.q_layernorm.weight", facts)
    with pytest.raises(ConvertInputError, match="normalization"):
        mindspore_name("decoder.layers.0.input_layernorm.weight", NamingFacts(family="mcore", normalization="Foo"))
    with pytest.raises(ConvertInputError):  # an RMSNorm has no bias
        mindspore_name("language_model.encoder.final_norm.bias", NamingFacts(normalization="RMSNorm"))
    with pytest.raises(ConvertInputError):
        megatron_name("language_model.encoder.layers.0.input_norm.gamma", NamingFacts(normalization="RMSNorm"))
    assert not is_parameter_name("step_num", facts) and not is_parameter_name("learning_rate_group_0", facts)


def test_the_table_covers_each_family_once_per_model_parameter():
    """Each MindSpore pattern a family reads back is produced by exactly one rule for any given run."""
    for family, te, tied in itertools.product(("legacy", "mcore"), (False, True), (False, True)):
        facts = NamingFacts(family=family, te_norms=te, tied=tied)
        targets = [r.mindspore for r in NAME_RULES if rule_applies(r, facts)]
        assert len(targets) == len(set(targets)), (family, te, tied)


def test_facts_module_knows_the_models_stage_split():
    # a pp 2 tied model: the last stage holds the zero-initialised head the checkpoint must fill
    last = param_names(MindSpeedStage(num_layers=2, pp=2, pp_rank=1))
    assert "language_model.output_layer.weight" in last
    assert "language_model.output_layer.weight" not in param_names(MindSpeedStage(num_layers=2))
    vpp = [MindSpeedStage(num_layers=8, pp=4, pp_rank=1, vpp=2, chunk=c).layers() for c in (0, 1)]
    assert [list(r) for r in vpp] == [[1], [5]]


# ---------------------------------------------------------------------------------------------
# End to end: the flag and the warning


def _flags(spec: FixtureSpec) -> list:
    return ["--tp-size", spec.tp, "--pp-size", spec.pp, "--dp-size", spec.dp, "--vpp-size", spec.vpp]


@pytest.fixture(scope="module")
def tp1_fixture(tmp_path_factory):
    spec = FixtureSpec(num_layers=2, max_position_embeddings=12, **SMALL)
    return write_fixture(tmp_path_factory.mktemp("names") / "save", spec)


@pytest.mark.parametrize("param_only", [False, True], ids=["full", "param_only"])
def test_name_style_documented_writes_the_documented_tools_names(tp1_fixture, tmp_path, param_only):
    spec = tp1_fixture.spec
    extra = ["--convert-param-only"] if param_only else []
    proc = run_cli("--megatron-path", tp1_fixture.megatron_path, "--ms-path", tmp_path, *_flags(spec),
                   "--name-style", "documented", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = load_record(tp1_fixture.root)
    expected = expected_tensors(record, tp_size=1, param_only=param_only, style="documented")
    scalars = {0: expected_scalars(tp1_fixture.megatron_path / "mp_rank_00" / "model_optim_rng.pt")}
    assert_rank_files_match(tmp_path, expected, scalars=scalars)
    assert "language_model.encoder.layers.0.input_norm.weight" in expected[0]


def test_position_table_rows_other_than_seq_length_are_warned_about(tp1_fixture, tmp_path):
    proc = run_cli("--megatron-path", tp1_fixture.megatron_path, "--ms-path", tmp_path, *_flags(tp1_fixture.spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [warning] = [line for line in proc.stdout.splitlines() if " WARNING " in line]
    assert "position_embeddings.weight has 12 rows" in warning and "seq_length is 8" in warning
    assert "must use seq_length 12" in warning
    loaded = load_ms(tmp_path / "rank_0" / "network.ckpt")
    assert loaded["language_model.embedding.position_embeddings.embedding_table"].shape == (12, SMALL["hidden"])
    check_rank_names(set(loaded), stages_of(load_record(tp1_fixture.root).meta, 0),
                     set(expected_scalars(tp1_fixture.megatron_path / "mp_rank_00" / "model_optim_rng.pt")))


def test_a_parameter_the_model_lacks_is_refused_with_the_way_out(tmp_path):
    """A parameter the MindSpore model does not have (a router in a legacy model) stops the run before
    any output, naming it."""
    import torch

    from tests.megatron_fixture import _megatron_enums_module, load_megatron_file
    spec = FixtureSpec(num_layers=2, **SMALL)
    fixture = write_fixture(tmp_path / "save", spec)
    model_file = fixture.megatron_path / "mp_rank_00" / "model_optim_rng.pt"
    sd = load_megatron_file(model_file)
    sd["model"]["language_model"]["encoder"]["layers.0.mlp.router.weight"] = torch.zeros(2, SMALL["hidden"])
    with _megatron_enums_module():
        torch.save(sd, model_file)
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out", *_flags(spec),
                   "--convert-param-only")
    assert proc.returncode == 2, proc.stdout
    [error] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert "layers.0.mlp.router.weight" in error and "--name-style documented" in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("rank_*"))
    ok = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "doc", *_flags(spec),
                 "--convert-param-only", "--name-style", "documented")
    assert ok.returncode == 0, ok.stdout
    assert "language_model.encoder.layers.0.mlp.router.weight" in load_ms(tmp_path / "doc" / "rank_0" / "network.ckpt")


def test_docs_list_every_rule_of_the_table():
    text = (Path(__file__).resolve().parent.parent / "docs" / "names.md").read_text()
    for rule in NAME_RULES:
        assert f"| `{rule.megatron}` | `{rule.mindspore}` |" in text, rule


def test_args_without_the_family_leave_it_to_the_names():
    assert naming_facts(None, keys=["decoder.layers.0.self_attention.linear_qkv.weight"]).family == "mcore"
    assert naming_facts(None, keys=["language_model.encoder.final_norm.weight"]).family == "legacy"
    assert naming_facts(None).normalization == "LayerNorm" and naming_facts(None).tied


def test_moe_layer_names_are_the_mindspeed_moe_models_and_read_back():
    """A megatron-core MoE layer (local spec, SequentialMLP experts, as named_parameters() gives it)
    gets exactly the MindSpeed MoE layer's names (tests/mindspeed_model_facts.py), and back."""
    from tests.mindspeed_model_facts import checkpoint_names
    n_local = 3
    layer = ["input_layernorm.weight", "input_layernorm.bias", "self_attention.linear_qkv.weight",
             "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
             "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias", "mlp.router.weight"]
    layer += [f"mlp.experts.local_experts.{k}.{fc}.{wb}" for k in range(n_local) for fc in ("linear_fc1", "linear_fc2")
              for wb in ("weight", "bias")]
    facts = NamingFacts(family="mcore")
    names = {mindspore_name(f"module.decoder.layers.0.{p}", facts, lambda i: i + 1): p for p in layer}
    stage = MindSpeedStage(num_layers=2, num_local_experts=n_local)
    want = {n for n in param_names(stage) if ".layers.1." in n}
    assert set(names) == want
    assert checkpoint_names(want) == {n for n in want if ".local_experts." not in n or ".local_experts.0." in n}
    for ms, megatron in names.items():
        assert megatron_name(f"exp_avg.{ms}", facts) == ("exp_avg", f"decoder.layers.1.{megatron}")
