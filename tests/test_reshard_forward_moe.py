"""Re-sharding the expert-parallel size on the way there, on MoE checkpoints written by the real
megatron-core 0.6.0 (tests/real_megatron.py): the experts regroup by global expert index (ep rank e
holds experts [e·E/ep, (e+1)·E/ep)), stacked per MindSpore rank under local expert 0's name, dense
state from the dense optimizer. Expected values are the state Megatron's own processes dumped when
they saved, named by the test oracle (tests/expected_outputs.py), not the converter's table; outputs
are read with the real mindspore.load_checkpoint and compared bit for bit, all three states."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    raise ImportError("tests/test_reshard_forward_moe.py needs the test dependency megatron-core==0.6.0: "
                      "python3 -m pip install -r requirements.txt")

from megatron_ms_convert.pt2ckpt import main as convert_main  # noqa: E402
from tests.expected_outputs import load_ms, mcore_mindspeed_name  # noqa: E402
from tests.helpers import in_process  # noqa: E402
from tests.mindspeed_model_facts import MindSpeedStage, checkpoint_names, ep_rank_of_dp, param_names  # noqa: E402
from tests.real_megatron import MegatronSpec, save_real_checkpoint  # noqa: E402

STATES = ("param", "exp_avg", "exp_avg_sq")
_MOE = dict(num_experts=4, hidden=34, heads=2, ffn=65, bucket_size=1500)
EP2 = MegatronSpec(dp=2, ep=2, **_MOE)
EP1 = MegatronSpec(dp=2, ep=1, **_MOE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_moe")
    return {"ep2": (EP2, save_real_checkpoint(root / "ep2", EP2, steps=2, param_map=True)),
            "ep1": (EP1, save_real_checkpoint(root / "ep1", EP1, steps=2, param_map=True))}


def global_state(spec: MegatronSpec, dump: dict) -> dict[str, np.ndarray]:
    """{MindSpore name of the global parameter (expert: its global index): array} for each state."""
    n_local = spec.num_experts // spec.ep
    out = {}
    for key, entry in dump["params"].items():
        parts = key.split("/")
        ep = int(parts.pop(2)[2:]) if parts[2].startswith("ep") else 0
        assert parts[0] == "tp0" and parts[1] == "pp0" and parts[2] == "chunk0", key
        name = mcore_mindspeed_name(parts[3])
        bits = name.split(".")
        if "local_experts" in bits:
            i = bits.index("local_experts") + 1
            bits[i] = str(ep * n_local + int(bits[i]))
            name = ".".join(bits)
        for state in STATES:
            out[name if state == "param" else f"{state}.{name}"] = entry[state].float().numpy()
    return out


def output_state(files: dict[int, dict], num_experts: int, ep: int) -> dict[str, np.ndarray]:
    """The same from the MindSpore files of dp ranks 0..ep-1 (ep rank = dp rank mod ep): dense tensors
    equal on every rank, stacked experts split back into global experts."""
    n_local = num_experts // ep
    out: dict[str, np.ndarray] = {}
    for dp, tensors in files.items():
        e = ep_rank_of_dp(dp, ep)
        for name, array in tensors.items():
            if array.ndim == 0 or "language_model" not in name:
                continue
            if ".local_experts.0." in name:
                assert array.shape[0] == n_local, name
                for k in range(n_local):
                    global_name = name.replace(".local_experts.0.", f".local_experts.{e * n_local + k}.")
                    assert global_name not in out or out[global_name].tobytes() == array[k].tobytes()
                    out[global_name] = array[k]
            else:
                assert name not in out or out[name].tobytes() == array.tobytes(), f"{name} differs between ranks"
                out[name] = array
    return out


@pytest.mark.parametrize("source,ms_ep,dp", [("ep2", 1, 1), ("ep2", 4, 4), ("ep1", 2, 2)],
                         ids=["ep2->1", "ep2->4", "ep1->2"])
def test_experts_regroup_by_global_index(saved, tmp_path, source, ms_ep, dp):
    spec, ckpt = saved[source]
    out = tmp_path / "ms"
    proc = in_process(convert_main, "--megatron-path", ckpt.path, "--param-map-path", ckpt.path.parent / "param_map",
                      "--ms-path", out, "--dp-size", dp, "--ms-ep-size", ms_ep)
    assert proc.returncode == 0, proc.stdout[-3000:]
    files = {d: load_ms(out / f"rank_{d}" / "network.ckpt") for d in range(dp)}
    want = global_state(spec, ckpt.state)
    got = output_state(files, spec.num_experts, ms_ep)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].tobytes() == want[name].tobytes(), name
    stage = MindSpeedStage(num_layers=spec.num_layers, num_local_experts=spec.num_experts // ms_ep)
    names = checkpoint_names(param_names(stage))
    for tensors in files.values():
        params = {n for n in tensors if "language_model" in n and not n.startswith("exp_avg")}
        assert params == names
