"""Checkpoints written and read by the real megatron-core 0.6.0 (tests/real_megatron.py) on CPU.

* The converter turns a real checkpoint into MindSpore files holding exactly the state Megatron's
  own processes had when they saved (tp/dp with padded buckets; pp with virtual chunks).
* Megatron's load path gives back the saved state bit for bit, at the same dp size and — for a MoE
  model with expert parallelism, whose dense and expert buckets both get re-padded — at another.
* A run resumed from the checkpoint trains exactly as the uninterrupted run (dropout on, so the
  saved RNG states matter).
"""

from __future__ import annotations

import importlib.util

import psutil
import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    raise ImportError("tests/test_real_megatron.py needs the test dependency megatron-core==0.6.0: "
                      "python3 -m pip install -r requirements.txt")

from tests.expected_outputs import (assert_rank_files_match, expected_scalars, mcore_mindspeed_name,  # noqa: E402
                                    ms_rank, run_cli)
from tests.real_megatron import MegatronSpec, dump_loaded_state, run_megatron, save_real_checkpoint  # noqa: E402
from tests.real_megatron import PP_VPP, TP_DP, assert_same_state  # noqa: E402

# ffn / tp = 33 makes bucket sizes odd, so dp 2 pads them and dp 4 pads them differently.
# hidden 34 leaves dense buckets of 2 mod 4 elements (unpadded at dp 2, padded at dp 4); ffn 65 leaves
# odd expert buckets (expert dp 1 at dp 2, 2 at dp 4).
MOE_EP2 = MegatronSpec(dp=2, ep=2, num_experts=4, hidden=34, heads=2, ffn=65, bucket_size=1500)


@pytest.fixture(scope="module")
def tp_dp_run(tmp_path_factory):
    """Run A: 2 steps, save, 2 more steps."""
    root = tmp_path_factory.mktemp("real_tp2_dp2") / "save"
    return save_real_checkpoint(root, TP_DP, steps=2, steps_after=2)


@pytest.fixture(scope="module")
def tp_dp_resumed(tp_dp_run):
    """Run B: load run A's checkpoint, dump, train 2 steps, dump."""
    root = tp_dp_run.path.parent
    return run_megatron(TP_DP, [("load", root), ("dump", "loaded"), ("train", 2), ("dump", "final")])


@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory):
    return save_real_checkpoint(tmp_path_factory.mktemp("real_moe_ep2") / "save", MOE_EP2, steps=2)


@pytest.fixture(scope="module")
def pp_vpp_saved(tmp_path_factory):
    return save_real_checkpoint(tmp_path_factory.mktemp("real_pp3_vpp2") / "save", PP_VPP, steps=2)


def global_layer_offset(spec: MegatronSpec, pp: int, chunk: int) -> int:
    per_chunk = spec.num_layers // (spec.pp * spec.vpp)
    return chunk * (spec.num_layers // spec.vpp) + pp * per_chunk


def ms_name(spec: MegatronSpec, key: str) -> tuple[int, int, str]:
    """(tp, pp, MindSpore name) of a dump key 'tp{t}/pp{p}/chunk{v}/<name>'."""
    tp, pp, chunk, name = key.split("/", 3)
    tp, pp, chunk = int(tp[2:]), int(pp[2:]), int(chunk[5:])
    return tp, pp, mcore_mindspeed_name(name, global_layer_offset(spec, pp, chunk))


def expected_from_dump(spec: MegatronSpec, state: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key, entry in state["params"].items():
        tp, pp, name = ms_name(spec, key)
        tensors = out.setdefault(ms_rank(tp, pp, spec.tp, spec.dp, 1), {})
        tensors[name] = entry["param"].numpy()
        tensors[f"exp_avg.{name}"] = entry["exp_avg"].numpy()
        tensors[f"exp_avg_sq.{name}"] = entry["exp_avg_sq"].numpy()
    return out


def scalars(spec: MegatronSpec, iter_dir) -> dict[int, dict]:
    out = {}
    for tp in range(spec.tp):
        for pp in range(spec.pp):
            folder = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if spec.pp > 1 else "")
            out[ms_rank(tp, pp, spec.tp, spec.dp, 1)] = expected_scalars(iter_dir / folder / "model_optim_rng.pt")
    return out


def convert_and_compare(spec: MegatronSpec, saved, out) -> int:
    proc = run_cli("--megatron-path", saved.path, "--ms-path", out, "--tp-size", spec.tp, "--pp-size", spec.pp,
                   "--dp-size", spec.dp, "--vpp-size", spec.vpp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = expected_from_dump(spec, saved.state)
    assert len(expected) == spec.tp * spec.pp
    return assert_rank_files_match(out, expected, scalars=scalars(spec, saved.path))


def test_layer_offsets_agree_with_megatron(tp_dp_run, pp_vpp_saved):
    for spec, saved in ((TP_DP, tp_dp_run), (PP_VPP, pp_vpp_saved)):
        for meta in saved.state["ranks"].values():
            for (_tp, pp, chunk), offset in meta["layer_offset"].items():
                assert offset == global_layer_offset(spec, pp, chunk)


def test_tp_dp_checkpoint_is_padded_and_multi_bucket(tp_dp_run):
    for meta in tp_dp_run.state["ranks"].values():
        (padded,) = meta["per_bucket_numel"][0].values()
        (unpadded,) = meta["per_bucket_numel_unpadded"][0].values()
        assert len(padded) >= 3 and padded != unpadded


def test_converted_tp_dp_equals_megatron_state(tp_dp_run, tmp_path):
    compared = convert_and_compare(TP_DP, tp_dp_run, tmp_path / "ms")
    assert compared >= 3 * len(tp_dp_run.state["params"])


def test_converted_pp_vpp_equals_megatron_state(pp_vpp_saved, tmp_path):
    compared = convert_and_compare(PP_VPP, pp_vpp_saved, tmp_path / "ms")
    assert compared >= 3 * len(pp_vpp_saved.state["params"])


def test_load_gives_the_saved_state(tp_dp_run, tp_dp_resumed):
    assert_same_state(tp_dp_resumed.dumps["loaded"], tp_dp_run.state)


def test_moe_checkpoint_has_expert_folders_and_chained_optimizer_state(moe_saved):
    folders = sorted(p.name for p in moe_saved.path.iterdir())
    assert folders == ["mp_rank_00_000", "mp_rank_00_001"]
    assert any("/ep1/" in key and "local_experts" in key for key in moe_saved.state["params"])
    assert set(moe_saved.state["ranks"]) == {(0, 0), (0, 0, 0), (0, 0, 1)}


def test_moe_load_at_another_dp_size_gives_the_saved_state(moe_saved):
    loaded = dump_loaded_state(moe_saved.path.parent, MOE_EP2.with_dp(4))
    assert_same_state(loaded, moe_saved.state)
    # Megatron had to re-pad: the padded bucket sizes of the dense and of the expert buffers differ
    # between dp 2 and dp 4 while the unpadded ones agree.
    for rank, meta in moe_saved.state["ranks"].items():
        assert loaded["ranks"][rank]["per_bucket_numel"] != meta["per_bucket_numel"], rank


def test_resumed_run_trains_exactly_like_the_uninterrupted_run(tp_dp_run, tp_dp_resumed):
    assert TP_DP.dropout > 0
    assert len(tp_dp_run.losses) == 4 and len(tp_dp_resumed.losses) == 2
    assert tp_dp_resumed.losses == tp_dp_run.losses[2:]
    assert_same_state(tp_dp_resumed.dumps["final"], tp_dp_run.final_state)
    # the two steps after the save changed the state, so the comparison above is not vacuous
    key = next(iter(tp_dp_run.state["params"]))
    assert not tp_dp_run.final_state["params"][key]["param"].equal(tp_dp_run.state["params"][key]["param"])


def test_workers_are_killed_when_the_job_fails():
    # processes this test did not start (a converter's fork server, say) may live on
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(TimeoutError, match="timed out"):
        run_megatron(MegatronSpec(dp=2), [("train", 1)], timeout=2)
    assert set(psutil.Process().children(recursive=True)) <= before
