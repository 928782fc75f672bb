"""The way back's Megatron side: distrib_optim.pt and model_optim_rng.pt rebuilt from a rank's pt_meta
record and the values the fixture recorded must equal the files Megatron (or the fixture, which
lays files out by Megatron's rules) wrote: same structure, dtype keys and sizes, values bitwise
outside padding, padding zeros; at another data-parallel size, equal to the checkpoint of that size.

Values come from the fixture's own record (expected.pt), never from the files under comparison."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_ms_convert.megatron.checkpoint import load_pt, megatron_enum_importable
from megatron_ms_convert.megatron.layout import list_param_map_files, read_rank_layouts
from megatron_ms_convert.megatron.pt_meta import (DOCUMENTED_KEYS, counts_from_meta, layouts_from_meta,
                                                  pt_meta_record, skeletons_from_meta)
from megatron_ms_convert.megatron.torch_writer import write_torch_file
from megatron_ms_convert.megatron.writer import (TensorSpec, TrainingUpdates, apply_training_updates,
                                                 distrib_optim_tree, model_optim_rng_tree, padded_bucket_size,
                                                 skeleton_specs)
from tests.expected_outputs import run_cli
from tests.megatron_fixture import FixtureSpec, write_fixture
from tests.helpers import Recorded, assert_distrib_equal, assert_same

SAMPLE = Path(__file__).parent / "data" / "megatron_sample"

FIXTURES = {
    "vpp_mcore_extra_state": FixtureSpec(pp=3, vpp=2, cp=2, num_layers=6, model="mcore"),
    "two_buffers_frozen": FixtureSpec(tp=2, pp=1, dp=2, mixed_dtype=True, frozen=("final_norm",)),
    "fp16_many_buckets": FixtureSpec(pp=2, dp=4, dtype="fp16", overlap_grad_reduce=True, bucket_size=300,
                                     vocab=51),
    "legacy_untied_fp32": FixtureSpec(pp=2, dp=3, dtype="fp32", untie_embeddings=True, num_layers=3,
                                      stage_list=(1, 2)),
}


def rank_folders(megatron_path: Path) -> list[tuple[int, int, Path]]:
    out = []
    for folder in sorted(megatron_path.glob("mp_rank_*")):
        parts = folder.name.split("_")[2:]
        out.append((int(parts[0]), int(parts[1]) if len(parts) > 1 else 0, folder))
    return out


def recorded_meta(tmp_path: Path, folder: Path, tp: int, pp: int, param_map_dir: Path) -> dict:
    """The pt_meta of a rank as convert_pt2ckpt writes it, read back the way the way back reads it."""
    model_sd = load_pt(folder / "model_optim_rng.pt")
    distrib = load_pt(folder / "distrib_optim.pt")
    num_chunks = sum(1 for k in model_sd if str(k).startswith("model"))
    layouts = read_rank_layouts(list_param_map_files(param_map_dir), tp, pp, num_chunks, param_map_dir)
    meta = pt_meta_record(model_sd, folder / "model_optim_rng.pt", distrib, layouts, None)
    path = tmp_path / f"args_tp{tp:02}_pp{pp:03}.pt"
    with megatron_enum_importable():
        torch.save(meta, path)
    return load_pt(path)


def rebuild_rank(tmp_path: Path, meta: dict, recorded: Recorded, tp: int, pp: int, dp_cp: int) -> tuple[Path, Path]:
    out = tmp_path / f"out_{tp}_{pp}"
    distrib = distrib_optim_tree(layouts_from_meta(meta, "pt_meta"), counts_from_meta(meta), dp_cp,
                                 recorded.state_value(tp, pp))
    write_torch_file(out / "distrib_optim.pt", distrib)
    entries = {key: meta[key] for key in DOCUMENTED_KEYS}
    model = model_optim_rng_tree(entries, skeletons_from_meta(meta), recorded.model_value(tp, pp), meta["state_keys"])
    with megatron_enum_importable():
        write_torch_file(out / "model_optim_rng.pt", model)
    return out / "distrib_optim.pt", out / "model_optim_rng.pt"


def check_fixture(tmp_path: Path, root: Path, megatron_path: Path, param_map_dir: Path) -> int:
    recorded = Recorded(root)
    buckets = 0
    for tp, pp, folder in rank_folders(megatron_path):
        meta = recorded_meta(tmp_path, folder, tp, pp, param_map_dir)
        dp_cp = padded_bucket_dp(meta)
        distrib, model = rebuild_rank(tmp_path, meta, recorded, tp, pp, dp_cp)
        buckets += assert_distrib_equal(distrib, folder / "distrib_optim.pt")
        assert_same(load_pt(model), load_pt(folder / "model_optim_rng.pt"))
    return buckets


def padded_bucket_dp(meta: dict) -> int:
    return meta["args"].data_parallel_size * getattr(meta["args"], "context_parallel_size", 1)


def test_megatron_written_sample(tmp_path):
    buckets = check_fixture(tmp_path, SAMPLE, SAMPLE / "iter_0000010", SAMPLE / "param_map")
    # 3 states x 2 tp ranks x (10 buckets on stage 0 + 2 on stage 1, the head copy in its own)
    assert buckets == 3 * 2 * (10 + 2)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_layouts(tmp_path, name):
    fx = write_fixture(tmp_path / "fx", FIXTURES[name])
    assert check_fixture(tmp_path, fx.root, fx.megatron_path, fx.param_map_dir) > 0


@pytest.mark.parametrize("source_dp,target_dp", [(2, 3), (3, 1)])
def test_another_data_parallel_size_equals_that_checkpoint(tmp_path, source_dp, target_dp):
    spec = FixtureSpec(pp=3, vpp=2, num_layers=6, overlap_grad_reduce=True, bucket_size=250, vocab=49, hidden=10,
                       ffn=25, seq_length=7)  # odd sizes, so that padding differs between dp sizes
    source = write_fixture(tmp_path / "source", replace(spec, dp=source_dp))
    target = write_fixture(tmp_path / "target", replace(spec, dp=target_dp), record=False)
    recorded = Recorded(source.root)
    padding_changed = False
    for tp, pp, folder in rank_folders(source.megatron_path):
        meta = recorded_meta(tmp_path, folder, tp, pp, source.param_map_dir)
        distrib, _ = rebuild_rank(tmp_path, meta, recorded, tp, pp, target_dp)
        assert_distrib_equal(distrib, target.megatron_path / folder.name / "distrib_optim.pt")
        padding_changed |= meta["per_bucket_numel"] != load_pt(distrib)["per_bucket_numel"]
    assert padding_changed  # the case really moved buckets


def test_padded_bucket_size_matches_megatron_rule():
    # Megatron pads each bucket's END index to a multiple of dp from a start that already is one.
    for dp in (1, 2, 3, 4, 8):
        start = 0
        for unpadded in (1, 7, 8, 9, 700, 2665):
            end = -(-(start + unpadded) // dp) * dp
            assert padded_bucket_size(unpadded, dp) == end - start
            start = end


def test_skeleton_keeps_nesting_extra_state_and_specs(tmp_path):
    fx = write_fixture(tmp_path / "fx", FIXTURES["vpp_mcore_extra_state"], record=False)
    [(tp, pp, folder), *_] = rank_folders(fx.megatron_path)
    meta = recorded_meta(tmp_path, folder, tp, pp, fx.param_map_dir)
    assert meta["folder_name"] == folder.name and meta["iteration_dir"] == "iter_0000010"
    assert meta["state_keys"][:5] == ["args", "checkpoint_version", "iteration", "model0", "model1"]
    skeletons = skeletons_from_meta(meta)
    original = load_pt(folder / "model_optim_rng.pt")
    extra = [k for k, v in original["model0"].items() if k.endswith("_extra_state")]
    assert extra and all(skeletons[0][k] == original["model0"][k] for k in extra)
    specs = dict(skeleton_specs(skeletons[1]))
    assert specs and all(isinstance(s, TensorSpec) for s in specs.values())
    assert {k: (tuple(v.shape), v.dtype) for k, v in original["model1"].items() if k not in extra} == \
        {k: (s.shape, s.dtype) for k, s in specs.items()}


def test_documented_pt_meta_has_no_additions():
    documented = {key: None for key in DOCUMENTED_KEYS}
    assert skeletons_from_meta(documented) is None and layouts_from_meta(documented, "x") is None
    assert counts_from_meta(documented) is None


def test_training_updates_change_only_their_fields(tmp_path):
    state = load_pt(SAMPLE / "iter_0000010" / "mp_rank_00_000" / "model_optim_rng.pt")
    updates = TrainingUpdates(iteration=25, consumed_train_samples=400, consumed_valid_samples=16, lr=2e-4,
                              optimizer_step=16, scheduler_num_steps=400, num_floating_point_operations_so_far=7)
    out = apply_training_updates(state, updates)
    assert out["iteration"] == 25 and out["args"].iteration == 25
    assert (out["args"].consumed_train_samples, out["args"].consumed_valid_samples) == (400, 16)
    assert all(g["lr"] == 2e-4 and g["step"] == 16 for g in out["optimizer"]["optimizer"]["param_groups"])
    assert out["opt_param_scheduler"]["num_steps"] == 400 and out["num_floating_point_operations_so_far"] == 7
    # the input is untouched, and nothing else changed
    assert state["iteration"] == 10 and state["args"].iteration == 10
    assert state["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.0005
    changed = {"iteration", "consumed_train_samples", "consumed_valid_samples"}
    assert {k: v for k, v in vars(out["args"]).items() if k not in changed} == \
        {k: v for k, v in vars(state["args"]).items() if k not in changed}
    assert out["model"] is state["model"] and out["rng_state"] is state["rng_state"]
    assert apply_training_updates(state, TrainingUpdates()) == state


def test_default_key_order_drops_absent_entries():
    entries = {"args": None, "checkpoint_version": 3.0, "iteration": 4, "optimizer": None,
               "opt_param_scheduler": None, "rng_state": None, "num_floating_point_operations_so_far": 0}
    skeleton = {"w": TensorSpec((2,), torch.bfloat16)}
    tree = model_optim_rng_tree(entries, [skeleton, skeleton], lambda c, k: torch.full((2,), float(c)))
    assert list(tree) == ["checkpoint_version", "iteration", "model0", "model1",
                          "num_floating_point_operations_so_far"]
    assert tree["model1"]["w"].produce().tolist() == [1.0, 1.0] and tree["model1"]["w"].dtype == torch.bfloat16


def test_pt_meta_written_by_the_cli_rebuilds_the_sample(tmp_path):
    proc = run_cli("--megatron-path", SAMPLE / "iter_0000010", "--tp-size", 2, "--pp-size", 2, "--dp-size", 2,
                   "--num-layers", 4, "--ms-path", tmp_path / "ms")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recorded = Recorded(SAMPLE)
    for tp, pp, folder in rank_folders(SAMPLE / "iter_0000010"):
        meta = load_pt(tmp_path / "ms" / "pt_meta" / f"args_tp{tp:02}_pp{pp:03}.pt")
        assert (meta["folder_name"], meta["iteration_dir"]) == (folder.name, "iter_0000010")
        distrib, model = rebuild_rank(tmp_path, meta, recorded, tp, pp, 2)
        assert assert_distrib_equal(distrib, folder / "distrib_optim.pt") == 3 * (10 if pp == 0 else 2)
        assert_same(load_pt(model), load_pt(folder / "model_optim_rng.pt"))
