"""The way back against the real megatron-core 0.6.0 (tests/real_megatron.py, on CPU): a real
checkpoint taken through convert_pt2ckpt and convert_ckpt2pt is loaded by Megatron's own
`load_checkpoint` / `DistributedOptimizer.load_parameter_state`, at the same and at another
data-parallel size, into exactly the state the saving processes had; and a run resumed from it
trains exactly as the uninterrupted run did (same losses, bit-identical fp32 params, Adam moments
and model copy after two more steps, dropout on)."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    raise ImportError("tests/test_real_megatron_back.py needs the test dependency megatron-core==0.6.0: "
                      "python3 -m pip install -r requirements.txt")

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main  # noqa: E402
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main  # noqa: E402
from tests.real_megatron import (MegatronSpec, dump_loaded_state, resume_and_train, run_megatron,  # noqa: E402
                                 save_real_checkpoint)  # noqa: E402
from tests.helpers import in_process  # noqa: E402
from tests.real_megatron import PP_VPP, TP_DP, assert_same_state  # noqa: E402


def there_and_back(spec: MegatronSpec, iter_dir, root, target_dp: int | None = None):
    """pt -> ckpt -> pt; returns the new --save root (holding latest_checkpointed_iteration.txt)."""
    sizes = ["--tp-size", spec.tp, "--pp-size", spec.pp, "--vpp-size", spec.vpp]
    forward = in_process(pt2ckpt_main, "--megatron-path", iter_dir, "--ms-path", root / "ms", *sizes,
                         "--dp-size", spec.dp)
    assert forward.returncode == 0, forward.stdout
    back = in_process(ckpt2pt_main, "--ms-path", root / "ms", "--param-map-path", root / "ms" / "pt_meta",
                      "--megatron-path", root / "back", *sizes, "--dp-size", target_dp or spec.dp, "--cp-size", 1,
                      "--ms-dp-size", spec.dp, "--verify")
    assert back.returncode == 0, back.stdout
    return root / "back"


@pytest.fixture(scope="module")
def tp_dp_round_trip(tmp_path_factory):
    """Run A (2 steps, save, 2 more steps) and its checkpoint taken there and back."""
    root = tmp_path_factory.mktemp("real_back_tp2_dp2")
    run = save_real_checkpoint(root / "save", TP_DP, steps=2, steps_after=2)
    return run, there_and_back(TP_DP, run.path, root)


@pytest.fixture(scope="module")
def tp_dp_resumed(tp_dp_round_trip):
    """Run B from the round trip: load (Megatron's own code), dump, train 2 steps, dump."""
    _, back = tp_dp_round_trip
    return run_megatron(TP_DP, [("load", back), ("dump", "loaded"), ("train", 2), ("dump", "final")])


def test_megatron_loads_the_round_trip_into_the_saved_state(tp_dp_round_trip, tp_dp_resumed):
    run, _ = tp_dp_round_trip
    assert_same_state(tp_dp_resumed.dumps["loaded"], run.state)


def test_megatron_loads_the_round_trip_at_another_dp_size(tp_dp_round_trip, tmp_path):
    run, _ = tp_dp_round_trip
    back = there_and_back(TP_DP, run.path, tmp_path, target_dp=1)
    loaded = dump_loaded_state(back, TP_DP.with_dp(1))
    assert_same_state(loaded, run.state)
    assert any(loaded["ranks"][r]["per_bucket_numel"] != meta["per_bucket_numel"]
               for r, meta in run.state["ranks"].items())  # the buckets really were re-padded


def test_resumed_from_the_round_trip_trains_like_the_uninterrupted_run(tp_dp_round_trip, tp_dp_resumed):
    run, _ = tp_dp_round_trip
    losses, final = tp_dp_resumed.losses, tp_dp_resumed.dumps["final"]
    assert TP_DP.dropout > 0 and len(losses) == 2
    assert losses == run.losses[2:]
    assert_same_state(final, run.final_state)
    key = next(iter(run.state["params"]))
    assert not run.final_state["params"][key]["param"].equal(run.state["params"][key]["param"])


def test_pp_vpp_round_trip_resumes_exactly(tmp_path):
    run = save_real_checkpoint(tmp_path / "save", PP_VPP, steps=2, steps_after=2)
    back = there_and_back(PP_VPP, run.path, tmp_path)
    losses, final = resume_and_train(back, PP_VPP, 2)
    assert losses == run.losses[2:]
    assert_same_state(final, run.final_state)
