"""The way back at another layout, against the real megatron-core 0.6.0 (tests/real_megatron.py):
a real checkpoint A at tp 2 · pp 2 goes to MindSpore at its own layout (convert_pt2ckpt.py), then
back to Megatron at tp 1 · pp 1 (convert_ckpt2pt.py --tp-size 1 --pp-size 1). Megatron's own
`load_checkpoint` + `load_parameter_state` at tp 1 · pp 1 must then hold A's GLOBAL state: every
parameter's fp32 master, Adam moments and bf16 model copy, assembled here from A's tp shards and
pipeline stages by code independent of the converter, bit for bit."""

from __future__ import annotations

import importlib.util
import re

import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    raise ImportError("tests/test_reshard_back.py needs the test dependency megatron-core==0.6.0: "
                      "python3 -m pip install -r requirements.txt")

import torch  # noqa: E402

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main  # noqa: E402
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main  # noqa: E402
from tests.helpers import in_process  # noqa: E402
from tests.real_megatron import (STATES, MegatronSpec, dump_loaded_state, global_state,  # noqa: E402
                                 save_real_checkpoint)

# one bucket per buffer (no overlap): Megatron r0.6.0's bucket size is not in its args, so the
# converter rebuilds buckets only for runs whose bucketing the args decide
SOURCE = MegatronSpec(tp=2, pp=2, dp=1, num_layers=2, ffn=64, overlap_grad_reduce=False)
TARGET = MegatronSpec(tp=1, pp=1, dp=1, num_layers=2, ffn=64, overlap_grad_reduce=False,
                      make_vocab_size_divisible_by=32)  # keeps the source's padded vocab (64) at tp 1


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_back")
    run = save_real_checkpoint(root / "save", SOURCE, steps=2)
    sizes = ["--tp-size", SOURCE.tp, "--pp-size", SOURCE.pp, "--vpp-size", 1]
    forward = in_process(pt2ckpt_main, "--multiprocess-off", "--megatron-path", run.path, "--ms-path", root / "ms",
                         *sizes,
                         "--dp-size", SOURCE.dp)
    assert forward.returncode == 0, forward.stdout
    return root, run


def back_at(ms, out, spec: MegatronSpec, ms_dp: int, ms_spec: MegatronSpec):
    back = in_process(ckpt2pt_main, "--multiprocess-off", "--ms-path", ms, "--param-map-path", ms / "pt_meta",
                      "--megatron-path", out,
                      "--tp-size", spec.tp, "--pp-size", spec.pp, "--vpp-size", 1, "--dp-size", spec.dp,
                      "--cp-size", 1, "--ms-dp-size", ms_dp, "--verify")
    assert back.returncode == 0, back.stdout
    assert "rng states cannot be re-sharded" in back.stdout
    # one `successfully` line per written folder, naming every MindSpore file that folder was built from
    lines = [line for line in back.stdout.splitlines() if "successfully" in line]
    assert len(lines) == spec.tp * spec.pp, back.stdout
    files_each = max(1, ms_spec.tp // spec.tp) * max(1, ms_spec.pp // spec.pp)
    for line in lines:
        assert len(set(re.findall(r"rank_\d+/network\.ckpt", line))) == files_each, line
    return out


def assert_global_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, states in want.items():
        for state, tensor in states.items():
            mine = got[name][state]
            assert mine.dtype == tensor.dtype and mine.shape == tensor.shape, (name, state)
            assert mine.contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), (name, state)


@pytest.fixture(scope="module")
def at_tp1_pp1(source_run):
    root, _ = source_run
    return back_at(root / "ms", root / "back", TARGET, SOURCE.dp, SOURCE)


def test_tp2_pp2_back_at_tp1_pp1_loads_into_megatron_with_the_global_state(source_run, at_tp1_pp1):
    _, run = source_run
    assert_global_equal(global_state(dump_loaded_state(at_tp1_pp1, TARGET), TARGET), global_state(run.state, SOURCE))


def test_tp1_pp1_back_at_tp2_pp2_splits_and_creates_the_head_copy(source_run, at_tp1_pp1):
    """The other way (tp 1 -> 2, pp 1 -> 2, the tied head copy created with its moments): A's tp 1 · pp 1
    form, to MindSpore at its layout and back at A's tp 2 · pp 2, loads into Megatron as A's state."""
    root, run = source_run
    forward = in_process(pt2ckpt_main, "--multiprocess-off", "--megatron-path", at_tp1_pp1 / "iter_0000002",
                         "--ms-path", root / "ms1",
                         "--tp-size", 1, "--pp-size", 1, "--vpp-size", 1, "--dp-size", 1)
    assert forward.returncode == 0, forward.stdout
    loaded = dump_loaded_state(back_at(root / "ms1", root / "back2", SOURCE, 1, TARGET), SOURCE)
    assert_global_equal(global_state(loaded, SOURCE), global_state(run.state, SOURCE))
    for state in STATES:  # the created copy is the embedding, moments included, on every tp rank
        for tp in range(SOURCE.tp):
            copy = loaded["params"][f"tp{tp}/pp1/chunk0/output_layer.weight"][state]
            embedding = loaded["params"][f"tp{tp}/pp0/chunk0/embedding.word_embeddings.weight"][state]
            assert copy.view(torch.uint8).equal(embedding.view(torch.uint8)), (tp, state)


def test_dry_run_prints_each_tensors_segments_and_writes_nothing(source_run, tmp_path):
    root, _ = source_run
    dry = in_process(ckpt2pt_main, "--ms-path", root / "ms", "--param-map-path", root / "ms" / "pt_meta",
                     "--megatron-path", tmp_path / "out", "--tp-size", 1, "--pp-size", 1, "--vpp-size", 1,
                     "--dp-size", 1, "--cp-size", 1, "--dry-run")
    assert dry.returncode == 0, dry.stdout
    line = next(x for x in dry.stdout.splitlines()
                if "model.decoder.layers.1.self_attention.linear_proj.weight [32, 32]" in x)
    # global layer 1 is stage 1's layer 0; its columns come half from each source tp rank
    assert "<- tp0 pp1 ep0 chunk0 " in line and "-> [0:32, 0:16] + tp1 pp1 ep0 chunk0 " in line
    assert line.endswith("-> [0:32, 16:32]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sizes, needles", [
    (("--tp-size", 3), ("heads", "--tp-size")),  # 4 heads
    (("--pp-size", 3), ("--pp-size", "layers")),  # 2 layers
])
def test_a_target_that_cannot_be_built_is_refused_in_one_line(source_run, tmp_path, sizes, needles):
    root, _ = source_run
    flags = {"--tp-size": 1, "--pp-size": 1, **dict([sizes])}
    refused = in_process(ckpt2pt_main, "--ms-path", root / "ms", "--param-map-path", root / "ms" / "pt_meta",
                         "--megatron-path", tmp_path / "out", *[x for kv in flags.items() for x in kv],
                         "--vpp-size", 1, "--dp-size", 1, "--cp-size", 1)
    assert refused.returncode == 2, refused.stdout
    [line] = [x for x in refused.stdout.splitlines() if " ERROR " in x]
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "out").exists()


MOE = MegatronSpec(tp=1, pp=1, dp=2, ep=2, num_experts=4, micro_batch=1, overlap_grad_reduce=False)


def test_moe_ep2_back_at_ep1_loads_into_megatron_with_the_global_state(tmp_path):
    """ep 2 -> 1: the experts of both ep ranks regrouped into one folder, by global expert index."""
    run = save_real_checkpoint(tmp_path / "save", MOE, steps=2)
    forward = in_process(pt2ckpt_main, "--multiprocess-off", "--megatron-path", run.path, "--ms-path",
                         tmp_path / "ms", "--tp-size", 1,
                         "--pp-size", 1, "--vpp-size", 1, "--dp-size", MOE.dp)
    assert forward.returncode == 0, forward.stdout
    target = MegatronSpec(tp=1, pp=1, dp=2, ep=1, num_experts=4, micro_batch=1, overlap_grad_reduce=False)
    back = in_process(ckpt2pt_main, "--multiprocess-off", "--ms-path", tmp_path / "ms", "--param-map-path",
                      tmp_path / "ms" / "pt_meta",
                      "--megatron-path", tmp_path / "back", "--tp-size", 1, "--pp-size", 1, "--vpp-size", 1,
                      "--ep-size", 1, "--dp-size", 2, "--cp-size", 1, "--ms-dp-size", MOE.dp, "--verify")
    assert back.returncode == 0, back.stdout
    want = {re.sub(r"^(tp\d+/pp\d+)/ep(\d+)/(chunk\d+/.*local_experts\.)(\d+)",
                   lambda m: f"{m.group(1)}/{m.group(3)}{int(m.group(2)) * 2 + int(m.group(4))}", k): v
            for k, v in run.state["params"].items()}
    got = dump_loaded_state(tmp_path / "back", target)["params"]
    assert sorted(got) == sorted(want)
    for key, states in want.items():
        for state in STATES:
            assert got[key][state].view(torch.uint8).equal(states[state].view(torch.uint8)), (key, state)
