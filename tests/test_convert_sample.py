"""End to end on the checkpoint Megatron-LM itself wrote (tests/data/megatron_sample): the CLI as a
subprocess, every output loaded with mindspore.load_checkpoint and compared with the sample's record."""

from __future__ import annotations

import json

import pytest

from tests.expected_outputs import (SAMPLE, VPP_SAMPLE, assert_rank_files_match, expected_scalars, expected_tensors,
                                    load_ms, load_record, load_trusted, ms_rank, run_cli)
from tests.mindspeed_model_facts import check_rank_names, stages_of

FLAGS = ["--megatron-path", SAMPLE / "iter_0000010", "--tp-size", 2, "--pp-size", 2, "--dp-size", 2,
         "--num-layers", 4]


@pytest.fixture(scope="module")
def record():
    return load_record(SAMPLE)


def sample_scalars(tp_size=2, dp_size=2, cp_size=1):
    out = {}
    for folder in sorted((SAMPLE / "iter_0000010").iterdir()):
        tp, pp = int(folder.name[8:10]), int(folder.name[11:14])
        out[ms_rank(tp, pp, tp_size, dp_size, cp_size)] = expected_scalars(folder / "model_optim_rng.pt")
    return out


def assert_names_are_the_models(out, root, rank_of_pp: dict[int, list[int]], scalars: dict[int, dict],
                                states=("param", "exp_avg", "exp_avg_sq"), fmt="ckpt", prefix="network"):
    """Each rank file holds exactly the parameters (and moments) of its stage's MindSpore model, plus scalars."""
    meta = load_record(root).meta
    for pp, ranks in rank_of_pp.items():
        for rank in ranks:
            loaded = load_ms(out / f"rank_{rank}" / f"{prefix}.{fmt}", fmt)
            check_rank_names(set(loaded), stages_of(meta, pp), set(scalars[rank]), states)


SAMPLE_RANKS = {0: [0, 1], 1: [4, 5]}


@pytest.fixture(scope="module")
def inferred_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inferred")
    proc = run_cli(*FLAGS, "--ms-path", out, "--save-param-map", out / "saved_map")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_inferred_layout_converts_every_tensor_exactly(inferred_run, record):
    out, proc = inferred_run
    expected = expected_tensors(record, tp_size=2, dp_size=2)
    assert sorted(expected) == [0, 1, 4, 5]
    compared = assert_rank_files_match(out, expected, scalars=sample_scalars())
    assert compared == 106 * 3 + 4 * len(sample_scalars()[0])
    assert_names_are_the_models(out, SAMPLE, SAMPLE_RANKS, sample_scalars())
    assert sorted(p.name for p in out.iterdir()) == ["pt_meta", "rank_0", "rank_1", "rank_4", "rank_5", "saved_map"]


def test_log_has_one_successfully_line_per_folder(inferred_run):
    _, proc = inferred_run
    lines = [line for line in proc.stdout.splitlines() if "successfully" in line]
    assert len(lines) == 4
    folders = sorted(line.split("'")[1].rsplit("/", 1)[1] for line in lines)
    assert folders == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert "summary: 4 converted, 0 skipped, 0 failed" in proc.stdout


def test_saved_param_map_equals_the_one_megatron_wrote(inferred_run):
    out, _ = inferred_run
    written = sorted(p.name for p in (out / "saved_map").iterdir())
    original = sorted(p.name for p in (SAMPLE / "param_map").iterdir())
    assert written == original
    for name in original:
        mine = json.loads((out / "saved_map" / name).read_text())
        theirs = json.loads((SAMPLE / "param_map" / name).read_text())
        assert list(mine.items()) == list(theirs.items()), name


def test_pt_meta_holds_args_and_layout(inferred_run):
    out, _ = inferred_run
    meta = out / "pt_meta"
    names = sorted(p.name for p in meta.iterdir())
    assert [n for n in names if n.startswith("args_")] == ["args_tp00_pp000.pt", "args_tp00_pp001.pt",
                                                           "args_tp01_pp000.pt", "args_tp01_pp001.pt"]
    assert len([n for n in names if n.startswith("param_map_buffer")]) == 4
    from megatron_ms_convert.megatron.checkpoint import load_pt
    args = load_pt(meta / "args_tp01_pp001.pt")
    source = load_trusted(SAMPLE / "iter_0000010/mp_rank_01_001/model_optim_rng.pt")
    assert args["iteration"] == 10 and args["checkpoint_version"] == source["checkpoint_version"]
    assert vars(args["args"]).keys() == vars(source["args"]).keys()
    assert args["opt_param_scheduler"] == source["opt_param_scheduler"]
    assert args["optimizer"] == source["optimizer"]


def test_given_param_map_gives_byte_identical_outputs(inferred_run, tmp_path):
    inferred, _ = inferred_run
    proc = run_cli(*FLAGS, "--ms-path", tmp_path, "--param-map-path", SAMPLE / "param_map")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout
    for rank in (0, 1, 4, 5):
        f = f"rank_{rank}/network.ckpt"
        assert (tmp_path / f).read_bytes() == (inferred / f).read_bytes(), f


def test_safetensors_format(record, tmp_path):
    proc = run_cli(*FLAGS, "--ms-path", tmp_path, "--format", "safetensors", "--file-prefix", "llm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_rank_files_match(tmp_path, expected_tensors(record, tp_size=2, dp_size=2), fmt="safetensors",
                            prefix="llm", scalars=sample_scalars())
    assert_names_are_the_models(tmp_path, SAMPLE, SAMPLE_RANKS, sample_scalars(), fmt="safetensors", prefix="llm")


def test_convert_param_only_takes_the_model_copy(record, tmp_path):
    proc = run_cli(*FLAGS, "--ms-path", tmp_path, "--convert-param-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = expected_tensors(record, tp_size=2, dp_size=2, param_only=True)
    assert_rank_files_match(tmp_path, expected, scalars=sample_scalars())
    assert_names_are_the_models(tmp_path, SAMPLE, SAMPLE_RANKS, sample_scalars(), states=("param",))
    meta = load_trusted(tmp_path / "pt_meta/args_tp00_pp001.pt")
    names = meta["param_name_list"]
    assert len(names) == 1 and names[0][0] == "model.word_embeddings_for_head.weight"
    assert not any(p.name.startswith("param_map") for p in (tmp_path / "pt_meta").iterdir())


def test_dist_opt_content_param_only(record, tmp_path):
    proc = run_cli(*FLAGS, "--ms-path", tmp_path, "--dist-opt-content", "param")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_rank_files_match(tmp_path, expected_tensors(record, tp_size=2, dp_size=2, states=("param",)),
                            scalars=sample_scalars())


def test_generate_all_dp_cp_with_cp2(record, tmp_path):
    proc = run_cli(*FLAGS, "--ms-path", tmp_path, "--cp-size", 2, "--generate-all-dp-cp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = sorted(int(p.name[5:]) for p in tmp_path.iterdir() if p.name.startswith("rank_"))
    assert ranks == list(range(16))
    expected = expected_tensors(record, tp_size=2, dp_size=2, cp_size=2)
    assert sorted(expected) == [0, 1, 8, 9]
    assert_rank_files_match(tmp_path, expected, scalars=sample_scalars(cp_size=2))
    for tp in range(2):
        for pp in range(2):
            primary = (tmp_path / f"rank_{ms_rank(tp, pp, 2, 2, 2)}" / "network.ckpt").read_bytes()
            for dp in range(2):
                for cp in range(2):
                    rank = ms_rank(tp, pp, 2, 2, 2, dp, cp)
                    assert (tmp_path / f"rank_{rank}" / "network.ckpt").read_bytes() == primary, rank
    assert len([line for line in proc.stdout.splitlines() if "successfully" in line]) == 4


# --- the real virtual-pipeline checkpoint (pp 4, vpp 2, dp 2) written by Megatron with our patch -------

VPP_FLAGS = ["--megatron-path", VPP_SAMPLE / "iter_0000002", "--tp-size", 1, "--pp-size", 4, "--dp-size", 2,
             "--vpp-size", 2, "--num-layers", 8]


def vpp_scalars():
    return {pp * 2: expected_scalars(VPP_SAMPLE / f"iter_0000002/mp_rank_00_{pp:03d}/model_optim_rng.pt")
            for pp in range(4)}


@pytest.mark.parametrize("with_map", [True, False], ids=["param_map_with_sidecars", "inferred"])
def test_real_vpp_checkpoint_converts_exactly(with_map, tmp_path):
    flags = ["--param-map-path", VPP_SAMPLE / "param_map"] if with_map else []
    proc = run_cli(*VPP_FLAGS, "--ms-path", tmp_path, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout
    record = load_record(VPP_SAMPLE)
    expected = expected_tensors(record, tp_size=1, dp_size=2)
    assert sorted(expected) == [0, 2, 4, 6]
    compared = assert_rank_files_match(tmp_path, expected, scalars=vpp_scalars())
    assert compared >= 101 * 3
    assert_names_are_the_models(tmp_path, VPP_SAMPLE, {pp: [2 * pp] for pp in range(4)}, vpp_scalars())
    assert len([line for line in proc.stdout.splitlines() if "successfully" in line]) == 4


def test_real_vpp_checkpoint_param_only(tmp_path):
    proc = run_cli(*VPP_FLAGS, "--ms-path", tmp_path, "--convert-param-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = expected_tensors(load_record(VPP_SAMPLE), tp_size=1, dp_size=2, param_only=True)
    assert_rank_files_match(tmp_path, expected, scalars=vpp_scalars())
    assert_names_are_the_models(tmp_path, VPP_SAMPLE, {pp: [2 * pp] for pp in range(4)}, vpp_scalars(),
                                states=("param",))
