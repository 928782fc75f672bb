"""End to end over many parallel layouts written by our fixture generator: each converted with the
param_map and without it (layout inferred from the checkpoint), every output loaded with
mindspore.load_checkpoint and compared element by element with the fixture's own record, and its
names compared with the parameters the MindSpore model of that stage has (tests/mindspeed_model_facts.py)."""

from __future__ import annotations

import json

import pytest

from tests.expected_outputs import (assert_rank_files_match, expected_scalars, expected_tensors, load_ms,
                                    load_record, ms_rank, run_cli)
from tests.megatron_fixture import FixtureSpec, write_fixture
from tests.mindspeed_model_facts import check_rank_names, stages_of
from tests.helpers import LAYOUTS, SMALL, size_flags


def scalars_per_rank(fixture, spec: FixtureSpec) -> dict[int, dict]:
    out = {}
    for folder in sorted(fixture.megatron_path.iterdir()):
        parts = folder.name.split("_")
        tp, pp = int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
        out[ms_rank(tp, pp, spec.tp, spec.dp, spec.cp)] = expected_scalars(folder / "model_optim_rng.pt")
    return out


def assert_names_are_the_models(ms_path, fixture, spec: FixtureSpec, fmt: str = "ckpt",
                                states=("param", "exp_avg", "exp_avg_sq"), scalars_known: bool = True) -> None:
    """Each rank file holds exactly the parameters (and moments) of its stage's MindSpore model, plus
    scalars (the oracle's; or, where the oracle cannot read the checkpoint, any name without a dot)."""
    meta = load_record(fixture.root).meta
    scalars = scalars_per_rank(fixture, spec) if scalars_known else None
    for tp in range(spec.tp):
        for pp in range(spec.pp):
            rank = ms_rank(tp, pp, spec.tp, spec.dp, spec.cp)
            loaded = set(load_ms(ms_path / f"rank_{rank}" / f"network.{fmt}", fmt))
            rank_scalars = set(scalars[rank]) if scalars else {name for name in loaded if "." not in name}
            check_rank_names(loaded, stages_of(meta, pp), rank_scalars, states)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def converted(request, tmp_path_factory):
    """A fixture checkpoint converted twice: with its param_map and with the layout inferred."""
    spec = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    fixture = write_fixture(root / "save", spec)
    by_map = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", root / "by_map",
                     "--param-map-path", fixture.param_map_dir, *size_flags(spec))
    inferred = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", root / "inferred",
                       *size_flags(spec), "--save-param-map", root / "saved_map")
    return spec, fixture, root, by_map, inferred


def test_every_tensor_equals_the_record(converted):
    spec, fixture, root, by_map, _ = converted
    assert by_map.returncode == 0, by_map.stdout + by_map.stderr
    assert "WARNING" not in by_map.stdout, by_map.stdout
    record = load_record(fixture.root)
    expected = expected_tensors(record, tp_size=spec.tp, dp_size=spec.dp, cp_size=spec.cp)
    assert len(expected) == spec.tp * spec.pp
    compared = assert_rank_files_match(root / "by_map", expected, scalars=scalars_per_rank(fixture, spec))
    assert compared > 3 * len(record.params)
    successes = [line for line in by_map.stdout.splitlines() if "successfully" in line]
    assert len(successes) == spec.tp * spec.pp


def test_names_are_the_mindspore_models(converted):
    spec, fixture, root, by_map, _ = converted
    assert by_map.returncode == 0, by_map.stdout + by_map.stderr
    assert_names_are_the_models(root / "by_map", fixture, spec)


def test_inferred_layout_gives_identical_files(converted):
    spec, _, root, _, inferred = converted
    assert inferred.returncode == 0, inferred.stdout + inferred.stderr
    files = sorted(p.relative_to(root / "by_map") for p in (root / "by_map").glob("rank_*/*"))
    assert files and files == sorted(p.relative_to(root / "inferred") for p in (root / "inferred").glob("rank_*/*"))
    for rel in files:
        assert (root / "by_map" / rel).read_bytes() == (root / "inferred" / rel).read_bytes(), rel


def test_saved_param_map_equals_the_fixtures(converted):
    _, fixture, root, _, _ = converted
    theirs = sorted(p.name for p in fixture.param_map_dir.glob("param_map_buffer*[0-9].json"))
    assert sorted(p.name for p in (root / "saved_map").iterdir()) == theirs
    for name in theirs:
        mine = json.loads((root / "saved_map" / name).read_text())
        want = json.loads((fixture.param_map_dir / name).read_text())
        assert list(mine.items()) == list(want.items()), name


@pytest.fixture(scope="module")
def vpp_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpp")
    return write_fixture(root / "save", LAYOUTS["pp4_vpp2_dp2_buckets_in_chunk0"])


@pytest.mark.parametrize("layout", ["pp4_vpp2_dp2_buckets_in_chunk0", "mcore_tp2_pp2_tied"])
def test_convert_param_only(layout, tmp_path):
    spec = LAYOUTS[layout]
    fixture = write_fixture(tmp_path / "save", spec)
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out", *size_flags(spec),
                   "--convert-param-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = expected_tensors(load_record(fixture.root), tp_size=spec.tp, dp_size=spec.dp, param_only=True)
    assert_rank_files_match(tmp_path / "out", expected, scalars=scalars_per_rank(fixture, spec))
    assert_names_are_the_models(tmp_path / "out", fixture, spec, states=("param",))


def test_safetensors_with_vpp(vpp_fixture, tmp_path):
    spec = vpp_fixture.spec
    proc = run_cli("--megatron-path", vpp_fixture.megatron_path, "--ms-path", tmp_path, *size_flags(spec),
                   "--format", "safetensors", "--dist-opt-content", "param", "exp_avg_sq")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = expected_tensors(load_record(vpp_fixture.root), tp_size=spec.tp, dp_size=spec.dp,
                                states=("param", "exp_avg_sq"))
    assert_rank_files_match(tmp_path, expected, fmt="safetensors", scalars=scalars_per_rank(vpp_fixture, spec))
    assert_names_are_the_models(tmp_path, vpp_fixture, spec, fmt="safetensors", states=("param", "exp_avg_sq"))


def test_generate_all_dp_cp_with_cp2(tmp_path):
    spec = LAYOUTS["mcore_cp2_release"]
    fixture = write_fixture(tmp_path / "save", spec)
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out", *size_flags(spec),
                   "--generate-all-dp-cp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = sorted(int(p.name[5:]) for p in (tmp_path / "out").glob("rank_*"))
    assert ranks == list(range(spec.tp * spec.dp * spec.cp))
    expected = expected_tensors(load_record(fixture.root), tp_size=spec.tp, dp_size=spec.dp, cp_size=spec.cp)
    for tp in range(spec.tp):
        primary = (tmp_path / "out" / f"rank_{ms_rank(tp, 0, spec.tp, spec.dp, spec.cp)}" / "network.ckpt")
        for dp in range(spec.dp):
            for cp in range(spec.cp):
                rank = ms_rank(tp, 0, spec.tp, spec.dp, spec.cp, dp, cp)
                assert (tmp_path / "out" / f"rank_{rank}" / "network.ckpt").read_bytes() == primary.read_bytes()
    assert_rank_files_match(tmp_path / "out", expected)
    assert_names_are_the_models(tmp_path / "out", fixture, spec)


def test_frozen_parameter_cannot_be_inferred_but_converts_with_its_map(tmp_path):
    spec = FixtureSpec(pp=2, dp=2, num_layers=2, frozen=("layers.0.input_norm",), **SMALL)
    fixture = write_fixture(tmp_path / "save", spec)
    inferred = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "a", *size_flags(spec))
    assert inferred.returncode == 2
    [error] = [line for line in inferred.stdout.splitlines() if " ERROR " in line]
    assert "mp_rank_00_000" in error and "bucket" in error and "elements" in error and "--param-map-path" in error
    assert not list((tmp_path / "a").glob("rank_*"))
    with_map = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "b", *size_flags(spec),
                       "--param-map-path", fixture.param_map_dir)
    assert with_map.returncode == 0, with_map.stdout
    assert "in no grad buffer (frozen?)" in with_map.stdout
    expected = expected_tensors(load_record(fixture.root), tp_size=spec.tp, dp_size=spec.dp)
    assert_rank_files_match(tmp_path / "b", expected, scalars=scalars_per_rank(fixture, spec))


def test_uneven_stages_need_the_stage_list(tmp_path):
    spec = LAYOUTS["uneven_stage_list"]
    fixture = write_fixture(tmp_path / "save", spec)
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out",
                   "--pp-size", 2, "--dp-size", 2)
    assert proc.returncode == 2
    [error] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert "--num-layers 5 is not divisible by --pp-size 2" in error and "--stage-list" in error


def test_stale_map_from_a_reused_save_folder_is_refused(tmp_path):
    """The documented patch numbers chunks by counting files, so a second run into the same --save
    shifts them: here a map of another model sits under the chunk name this checkpoint needs."""
    fixture = write_fixture(tmp_path / "save", LAYOUTS["tp1_pp1_dp1"])
    other = write_fixture(tmp_path / "other", FixtureSpec(num_layers=2, hidden=32, ffn=52, heads=2, vocab=61))
    for path in other.param_map_dir.glob("*.json"):
        (fixture.param_map_dir / path.name).write_text(path.read_text())
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out",
                   "--param-map-path", fixture.param_map_dir)
    assert proc.returncode == 2
    [error] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert "param_map_buffer0_dp0tp0pp0vpp0.json" in error and "--param-map-path" in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("rank_*"))


def test_transformer_engine_extra_state_tensors_are_not_parameters(tmp_path):
    """Newer Transformer Engine saves `_extra_state` as a uint8 tensor; it must neither break the
    layout inference nor appear in a --convert-param-only output."""
    import torch

    from tests.megatron_fixture import _megatron_enums_module, load_megatron_file

    spec = LAYOUTS["mcore_tp2_pp2_tied"]
    fixture = write_fixture(tmp_path / "save", spec)
    for model_file in fixture.megatron_path.glob("*/model_optim_rng.pt"):
        sd = load_megatron_file(model_file)
        extra = [k for k in sd["model"] if k.endswith("_extra_state")]
        assert extra
        for key in extra:
            sd["model"][key] = torch.arange(7, dtype=torch.uint8)
        with _megatron_enums_module():
            torch.save(sd, model_file)
    record = load_record(fixture.root)
    for extra_flags, param_only in (([], False), (["--convert-param-only"], True)):
        out = tmp_path / ("param_only" if param_only else "optimizer")
        proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", out, *size_flags(spec), *extra_flags)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        expected = expected_tensors(record, tp_size=spec.tp, dp_size=spec.dp, param_only=param_only)
        assert_rank_files_match(out, expected, scalars=scalars_per_rank(fixture, spec))
        assert_names_are_the_models(out, fixture, spec, states=("param",) if param_only else
                                    ("param", "exp_avg", "exp_avg_sq"))


def test_sidecar_from_another_run_is_refused(tmp_path):
    spec = LAYOUTS["sidecar_map"]
    fixture = write_fixture(tmp_path / "save", spec)
    sidecar = fixture.param_map_dir / "param_map_buffer0_dp0tp1pp0vpp0.meta.json"
    for copy in (sidecar, fixture.param_map_dir / "param_map_buffer0_dp1tp1pp0vpp0.meta.json"):  # every dp rank's
        meta = json.loads(copy.read_text())
        meta["buckets"][0]["numel_unpadded"] -= 2  # recorded by a run with another model
        copy.write_text(json.dumps(meta))
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out", *size_flags(spec),
                   "--param-map-path", fixture.param_map_dir)
    assert proc.returncode == 2
    [error] = [line for line in proc.stdout.splitlines() if " ERROR " in line]
    assert str(sidecar) in error and "bucket layout differs" in error


def test_map_that_disagrees_with_the_checkpoint_layout_stops_unless_told_which_to_trust(tmp_path):
    """Two same-shaped parameters swapped in the map pass every structural check, but differ from the
    layout the checkpoint implies: one of the two is wrong, so the run stops naming both parameters,
    and --trust-layout picks one explicitly."""
    spec = LAYOUTS["tp1_pp1_dp1"]
    fixture = write_fixture(tmp_path / "save", spec)
    path = fixture.param_map_dir / "param_map_buffer0_dp0tp0pp0vpp0.json"
    layout = json.loads(path.read_text())
    a, b = "module.language_model.encoder.layers.0.input_norm.weight", \
        "module.language_model.encoder.layers.1.input_norm.weight"
    layout[a][2:], layout[b][2:] = layout[b][2:], layout[a][2:]
    path.write_text(json.dumps(layout))

    def convert(out, *extra):
        return run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / out, *size_flags(spec),
                       "--param-map-path", fixture.param_map_dir, *extra)

    refused = convert("refused")
    assert refused.returncode == 2, refused.stdout
    [error] = [line for line in refused.stdout.splitlines() if " ERROR " in line]
    assert a in error and b in error and "differ in 2 places" in error and "--trust-layout" in error
    assert not list((tmp_path / "refused").glob("rank_*"))

    record = load_record(fixture.root)
    truth = expected_tensors(record, tp_size=1)
    trusted_checkpoint = convert("checkpoint", "--trust-layout", "checkpoint")
    assert trusted_checkpoint.returncode == 0, trusted_checkpoint.stdout
    assert_rank_files_match(tmp_path / "checkpoint", truth)

    trusted_map = convert("map", "--trust-layout", "map")
    assert trusted_map.returncode == 0, trusted_map.stdout
    warnings = [line for line in trusted_map.stdout.splitlines() if "WARNING param_map differs" in line]
    assert len(warnings) == 2 and a in warnings[0] + warnings[1] and b in warnings[0] + warnings[1]
    from tests.expected_outputs import load_ms, ms_name
    loaded = load_ms(tmp_path / "map" / "rank_0" / "network.ckpt")
    # the map swapped the two spans, so the values follow the map: a's name holds b's values
    name_a, name_b = ms_name(a), ms_name(b)
    assert loaded[name_a].tobytes() == truth[0][name_b].tobytes()


def test_release_checkpoint_without_iteration_and_tensor_valued_optimizer_numbers(tmp_path):
    """Conversion tools write release/ checkpoints without 'iteration' (Megatron then starts at 0), and
    capturable optimizers keep lr and step as one-element tensors: both still convert."""
    import torch

    from tests.megatron_fixture import _megatron_enums_module, load_megatron_file

    spec = FixtureSpec(pp=2, num_layers=2, release=True, **SMALL)
    fixture = write_fixture(tmp_path / "save", spec)
    for model_file in fixture.megatron_path.glob("*/model_optim_rng.pt"):
        sd = load_megatron_file(model_file)
        del sd["iteration"]
        for group in sd["optimizer"]["optimizer"]["param_groups"]:
            group["lr"], group["step"] = torch.tensor(group["lr"]), torch.tensor([group["step"]])
        with _megatron_enums_module():
            torch.save(sd, model_file)
    proc = run_cli("--megatron-path", fixture.megatron_path, "--ms-path", tmp_path / "out", *size_flags(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_names_are_the_models(tmp_path / "out", fixture, spec, scalars_known=False)
    loaded = load_ms(tmp_path / "out" / "rank_1" / "network.ckpt")
    assert loaded["step_num"] == 0 and loaded["learning_rate_group_0"].dtype.name == "float32"
    sd = load_megatron_file(fixture.megatron_path / "mp_rank_00_001" / "model_optim_rng.pt")
    groups = sd["optimizer"]["optimizer"]["param_groups"]
    assert loaded["learning_rate_group_1"] == groups[1]["lr"].float().item()
    assert loaded["state_step"].tolist() == [float(groups[-1]["step"].item())]
