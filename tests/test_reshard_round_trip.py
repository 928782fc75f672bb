"""Must-show 3, the round trip: a Megatron checkpoint A -> MindSpore at ANOTHER layout
(convert_pt2ckpt.py --ms-*) -> Megatron at A's layout (convert_ckpt2pt.py, which reads the
re-sharded files' layout from pt_meta/layout.json) equals A bit for bit outside padding.

What is compared, with torch.load and the source's own records only (no converter code):
- the same files: every `iter_*/mp_rank_*/{model_optim_rng.pt, distrib_optim.pt}` of A, nothing else,
  and latest_checkpointed_iteration.txt;
- model_optim_rng.pt: the whole tree as torch.load reads it -- args (every field), iteration,
  checkpoint_version, optimizer (param_groups included), opt_param_scheduler, rng_state,
  num_floating_point_operations_so_far, each model tensor (dtype, shape, stride, bytes) and every other
  entry (`_extra_state`), in the same key order;
- distrib_optim.pt: the same structure (list form of a MoE run, None elements, gbuf indices, dtype keys,
  states), per_bucket_numel and per_bucket_numel_unpadded equal, every bucket tensor of the same dtype
  and size, and its elements compared bitwise over the parameters' ranges only, as the source's own
  param_map gives them: the fixture's record (buffer start / end of every parameter) or, for the
  real-Megatron MoE runs, the `param_index_map` of Megatron's DDP dumped when it saved. Those ranges
  are checked to tile each bucket's unpadded part exactly, so only the padding is left out (the
  fixture fills it with NaN, Megatron and the converter with zeros).

The sources are the fixture generator's, with `synced_copies` (replicated parameters equal on every
tp rank and the tied head copy equal to the embedding, as a trained run keeps them: otherwise a tp
or pp change could not come back bit for bit), and real megatron-core 0.6.0 MoE runs for the ep
pairs. The last test loads the way back at a third layout into real Megatron."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    raise ImportError("tests/test_reshard_round_trip.py needs the test dependency megatron-core==0.6.0: "
                      "python3 -m pip install -r requirements.txt")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main  # noqa: E402
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main  # noqa: E402
from tests.expected_outputs import load_record  # noqa: E402
from tests.helpers import assert_same, error_lines, in_process, mindspore_train_step  # noqa: E402
from tests.megatron_fixture import FixtureSpec, load_megatron_file, write_fixture  # noqa: E402
from tests.real_megatron import MegatronSpec, dump_loaded_state, save_real_checkpoint  # noqa: E402

STATES = ("param", "exp_avg", "exp_avg_sq")
PT_FILES = ("model_optim_rng.pt", "distrib_optim.pt")

# legacy: LayerNorm, learned positions, tied; mcore: the local spec tied at pp 4 (a head copy on the last
# stage), and the Transformer Engine spec (norms fused into the linears), RMSNorm, rope, untied with vpp
# (at the records' own layout the way back takes each folder's structure from its record, so TE's
# fused-norm order, which it does not build at other layouts, comes back too).
_DIMS = dict(hidden=16, heads=4, ffn=40, vocab=50, seq_length=8, dp=1, synced_copies=True)
SOURCES = {
    "legacy-tp2pp2": FixtureSpec(tp=2, pp=2, num_layers=4, make_vocab_size_divisible_by=4, **_DIMS),
    "legacy-tp1pp1": FixtureSpec(tp=1, pp=1, num_layers=4, make_vocab_size_divisible_by=8, **_DIMS),
    "mcore-pp4vpp2": FixtureSpec(tp=1, pp=4, vpp=2, num_layers=8, model="mcore", mcore_spec="te",
                                 normalization="RMSNorm", position_embedding="rope", untie_embeddings=True,
                                 make_vocab_size_divisible_by=8, **_DIMS),
    "mcore-tp2pp4": FixtureSpec(tp=2, pp=4, num_layers=4, model="mcore", make_vocab_size_divisible_by=4, **_DIMS),
}

# (source, the MindSpore layout's --ms-* flags)
CASES = [
    ("legacy-tp2pp2", ["--ms-tp-size", 1]),  # tp 2 -> 1
    ("legacy-tp1pp1", ["--ms-tp-size", 2]),  # tp 1 -> 2
    ("legacy-tp2pp2", ["--ms-tp-size", 4]),  # tp 2 -> 4
    ("legacy-tp2pp2", ["--ms-pp-size", 1]),  # pp 2 -> 1: the tied copy dropped there, created on the way back
    ("legacy-tp1pp1", ["--ms-pp-size", 2]),  # pp 1 -> 2: the copy created there, dropped on the way back
    # pp 4 . vpp 2 -> pp 1 (a Megatron fixture cannot be pp 2 . vpp 2: r0.6.0 needs pp > 2 for vpp)
    ("mcore-pp4vpp2", ["--ms-pp-size", 1]),
    ("mcore-tp2pp4", ["--ms-pp-size", 2]),  # pp 4 -> 2
    ("legacy-tp2pp2", ["--ms-pp-size", 3, "--ms-stage-list", 1, 2, 1]),  # an uneven --ms-stage-list
    ("legacy-tp2pp2", ["--ms-tp-size", 1, "--ms-pp-size", 4]),  # tp 2 . pp 2 -> tp 1 . pp 4
]


def _case_id(case) -> str:
    source, flags = case
    return source + "->" + "".join(str(f).removeprefix("--ms-").removesuffix("-size") for f in flags)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("round_trip_sources")
    return {name: write_fixture(root / name, spec) for name, spec in SOURCES.items()}


def size_flags(tp: int, pp: int, vpp: int = 1, dp: int = 1, ep: int | None = None) -> list:
    return ["--tp-size", tp, "--pp-size", pp, "--vpp-size", vpp, "--dp-size", dp, "--cp-size", 1] + (
        ["--ep-size", ep] if ep else [])


def to_mindspore(ms: Path, *flags) -> None:
    forward = in_process(pt2ckpt_main, "--multiprocess-off", "--ms-path", ms, *flags)
    assert forward.returncode == 0, forward.stdout[-3000:]


def back(ms: Path, out: Path, *flags) -> None:
    # one process: a worker forked from pytest after MindSpore's threads started can hang
    proc = in_process(ckpt2pt_main, "--multiprocess-off", "--ms-path", ms, "--param-map-path", ms / "pt_meta",
                      "--megatron-path", out, "--verify", *flags)
    assert proc.returncode == 0, proc.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# The comparison: torch.load and the source's param ranges


Ranges = dict[tuple[str, int, int, int], list[tuple[int, int]]]  # (folder, optimizer, gbuf, bucket) -> ranges


def fixture_ranges(root: Path, distrib: dict[str, object]) -> Ranges:
    """Each bucket's parameter ranges (bucket-relative) from the fixture's record: a parameter lies at
    [buffer_start, buffer_end) of its buffer, the bucket at the sum of the earlier buckets' padded sizes
    (per_bucket_numel of A's distrib_optim.pt)."""
    record = load_record(root)
    out: Ranges = {}
    for entry in record.params:
        if entry["gbuf_idx"] is None:
            continue  # frozen: in no buffer
        folder = f"mp_rank_{entry['tp']:02d}" + (f"_{entry['pp']:03d}" if record.meta["pp"] > 1 else "")
        [sizes] = distrib[folder]["per_bucket_numel"][entry["gbuf_idx"]].values()
        start = sum(sizes[:entry["bucket"]])
        out.setdefault((folder, 0, entry["gbuf_idx"], entry["bucket"]), []).append(
            (entry["buffer_start"] - start, entry["buffer_end"] - start))
    return out


def megatron_ranges(state: dict, spec: MegatronSpec) -> Ranges:
    """The same from Megatron's own DDP `param_index_map`, dumped by the run that saved (real_megatron):
    keys tp{t}/pp{p}[/ep{e}]/chunk{v}/name; the dense optimizer's parameters are in ep rank 0's folder,
    the expert-parallel ones (an ep part) in their ep rank's folder, as optimizer 1 of the list form."""
    out: Ranges = {}
    for key, entry in state["params"].items():
        tp, pp, ep = re.match(r"tp(\d+)/pp(\d+)/(?:ep(\d+)/)?", key).groups()
        folder = f"mp_rank_{int(tp):02d}" + (f"_{int(pp):03d}" if spec.pp > 1 else "") \
            + (f"_{int(ep or 0):03d}" if spec.ep > 1 else "")
        gbuf, bucket, start, end = entry["bucket"]
        out.setdefault((folder, int(ep is not None), gbuf, bucket), []).append((start, end))
    return out


def assert_buckets_equal_over(got: torch.Tensor, want: torch.Tensor, ranges: list[tuple[int, int]],
                              unpadded: int, where: str) -> int:
    """Bitwise equal over `ranges`, which must tile [0, unpadded): all but the padding is compared."""
    assert got.dtype == want.dtype and got.shape == want.shape, where
    assert sorted(ranges)[0][0] == 0 and all(a[1] == b[0] for a, b in zip(sorted(ranges), sorted(ranges)[1:])) \
        and max(end for _, end in ranges) == unpadded, (where, sorted(ranges), unpadded)
    for start, end in ranges:
        assert got[start:end].view(torch.int32).equal(want[start:end].view(torch.int32)), (where, start, end)
    return unpadded


def assert_distrib_equal(got: object, want: object, ranges: Ranges, folder: str) -> int:
    """distrib_optim.pt of one folder; returns the elements compared."""
    compared = 0
    form = isinstance(want, list)
    assert isinstance(got, list) == form, folder
    for optimizer, (mine, theirs) in enumerate(zip(got, want) if form else [(got, want)]):
        if theirs is None:
            assert mine is None, folder
            continue
        assert list(mine) == list(theirs), folder
        assert_same(mine["per_bucket_numel"], theirs["per_bucket_numel"], f"{folder} per_bucket_numel")
        assert_same(mine["per_bucket_numel_unpadded"], theirs["per_bucket_numel_unpadded"], folder)
        for gbuf in (k for k in theirs if isinstance(k, int)):
            assert list(mine[gbuf]) == list(theirs[gbuf]), (folder, gbuf)
            for dtype_key, by_state in theirs[gbuf].items():
                assert list(mine[gbuf][dtype_key]) == list(by_state), (folder, gbuf)
                [unpadded] = [sizes for sizes in theirs["per_bucket_numel_unpadded"][gbuf].values()]
                for state in STATES:
                    assert len(mine[gbuf][dtype_key][state]) == len(by_state[state]), (folder, gbuf, state)
                    for bucket, tensor in enumerate(by_state[state]):
                        compared += assert_buckets_equal_over(
                            mine[gbuf][dtype_key][state][bucket], tensor, ranges[(folder, optimizer, gbuf, bucket)],
                            unpadded[bucket], f"{folder} optimizer {optimizer} gbuf {gbuf} {state} bucket {bucket}")
    return compared


def assert_round_trip(got_root: Path, want_root: Path, ranges_of) -> None:
    """Megatron save folder `got_root` holds what `want_root` holds (see the module's docstring);
    `ranges_of(distrib files by folder)` gives each bucket's parameter ranges."""
    want_files = sorted(str(p.relative_to(want_root)) for p in want_root.glob("iter_*/mp_rank_*/*.pt"))
    got_files = sorted(str(p.relative_to(got_root)) for p in got_root.glob("iter_*/mp_rank_*/*.pt"))
    assert got_files == want_files and want_files
    assert {Path(f).name for f in want_files} == set(PT_FILES)
    tracker = "latest_checkpointed_iteration.txt"
    assert (got_root / tracker).read_text() == (want_root / tracker).read_text()
    distrib = {Path(f).parent.name: load_megatron_file(want_root / f) for f in want_files
               if f.endswith("distrib_optim.pt")}
    ranges = ranges_of(distrib)
    compared = 0
    for name in want_files:
        got, want = load_megatron_file(got_root / name), load_megatron_file(want_root / name)
        if name.endswith("model_optim_rng.pt"):
            assert_same(got, want, name)
        else:
            compared += assert_distrib_equal(got, want, ranges, Path(name).parent.name)
    assert compared and compared == sum(end - start for spans in ranges.values() for start, end in spans) * 3


# ---------------------------------------------------------------------------------------------
# Dense: the fixture's checkpoints


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_round_trip_through_another_layout_gives_back_every_byte_outside_padding(case, sources, tmp_path):
    fx = sources[case[0]]
    to_mindspore(tmp_path / "ms", *fx.convert_flags(), *case[1])
    assert (tmp_path / "ms" / "pt_meta" / "layout.json").is_file()
    back(tmp_path / "ms", tmp_path / "back")  # no size flags: the Megatron run's layout, from pt_meta
    assert_round_trip(tmp_path / "back", fx.root, lambda distrib: fixture_ranges(fx.root, distrib))


def test_the_comparison_sees_a_changed_element(sources, tmp_path):
    """The comparison is not blind: one element of one moment changed in A's copy is found."""
    fx = sources["legacy-tp2pp2"]
    to_mindspore(tmp_path / "ms", *fx.convert_flags(), "--ms-tp-size", 1)
    back(tmp_path / "ms", tmp_path / "back", *size_flags(2, 2))
    path = tmp_path / "back" / "iter_0000010" / "mp_rank_01_001" / "distrib_optim.pt"
    tree = load_megatron_file(path)
    [by_state] = tree[0].values()
    by_state["exp_avg_sq"][0][3] += 1
    torch.save(tree, path)
    with pytest.raises(AssertionError, match="exp_avg_sq bucket 0"):
        assert_round_trip(tmp_path / "back", fx.root, lambda distrib: fixture_ranges(fx.root, distrib))


def test_replicas_that_differ_across_the_mindspore_tp_ranks_stop_unless_a_policy_is_given(tmp_path):
    """The way back checks the replicated copies of the MindSpore files' tp ranks too, and honours
    --replica-policy. The fixture without synced_copies (each tp rank's norms hold their own values)
    converted at its own layout keeps each tp rank's copy; the way there re-shards only after its own
    check, so this is how MindSpore files with drifted copies look."""
    fx = write_fixture(tmp_path / "A", FixtureSpec(tp=2, pp=1, num_layers=2, hidden=16, heads=4, ffn=40, vocab=50,
                                                   make_vocab_size_divisible_by=4))
    ms = tmp_path / "ms"
    to_mindspore(ms, *fx.convert_flags())
    flags = ["--multiprocess-off", "--ms-path", ms, "--param-map-path", ms / "pt_meta", *size_flags(1, 1)]
    refused = in_process(ckpt2pt_main, *flags, "--megatron-path", tmp_path / "b0")
    assert refused.returncode == 1
    assert any("replicated copies" in line and "--replica-policy" in line for line in error_lines(refused))
    record = load_record(fx.root)
    norm = "language_model.encoder.layers.1.input_norm.weight"
    copies = [record.tensors[f"tp{t}/pp0/chunk0/module.{norm}::param"] for t in range(2)]
    for policy, want in (("first", copies[0]), ("mean", ((copies[0].double() + copies[1].double()) / 2).float())):
        out = tmp_path / f"back-{policy}"
        proc = in_process(ckpt2pt_main, *flags, "--megatron-path", out, "--replica-policy", policy, "--verify")
        assert proc.returncode == 0, proc.stdout[-2000:]
        model = load_megatron_file(out / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")["model"]
        got = model["language_model"]["encoder"][norm.removeprefix("language_model.encoder.")]
        assert got.equal(want.to(got.dtype)), policy


@pytest.fixture(scope="module")
def tp1_pp4_files(sources, tmp_path_factory):
    """legacy-tp2pp2 re-sharded to MindSpore tp 1 . pp 4."""
    ms = tmp_path_factory.mktemp("tp1pp4") / "ms"
    to_mindspore(ms, *sources["legacy-tp2pp2"].convert_flags(), "--ms-tp-size", 1, "--ms-pp-size", 4)
    return ms


def test_mindspore_numbering_other_than_layout_json_says_is_refused(tp1_pp4_files, tmp_path):
    ms = tp1_pp4_files
    proc = in_process(ckpt2pt_main, "--ms-path", ms, "--param-map-path", ms / "pt_meta", "--megatron-path",
                      tmp_path / "out", *size_flags(2, 2), "--ms-dp-size", 2)
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "--ms-dp-size 2" in line and "pass --ms-dp-size 1 --ms-cp-size 1" in line, line
    assert not (tmp_path / "out").exists()


def test_dry_run_from_re_sharded_files_prints_the_segments_of_each_folder(tp1_pp4_files, tmp_path):
    """MindSpore tp 1 . pp 4 (one layer per stage) back at tp 2 . pp 2: global layer 3 is MindSpore
    stage 3's and Megatron stage 1's local layer 1, its rows split over the two tp ranks."""
    ms = tp1_pp4_files
    proc = in_process(ckpt2pt_main, "--ms-path", ms, "--param-map-path", ms / "pt_meta", "--megatron-path",
                      tmp_path / "out", *size_flags(2, 2), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-2000:]
    key = "model.language_model.encoder.layers.1.self_attention.query_key_value.weight [24, 16]"
    source = "<- tp0 pp3 ep0 chunk0 language_model.encoder.layers.3.attention.qkv_proj.weight "
    lines = [x for x in proc.stdout.splitlines() if key in x and source in x]
    assert len(lines) == 2, lines  # one per target tp rank of stage 1 (stage 0's local layer 1 is layer 1)
    assert "[0:24, 0:16] -> [0:24, 0:16]" in lines[0] and "[24:48, 0:16] -> [0:24, 0:16]" in lines[1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# MoE: real megatron-core checkpoints, ep 2 -> 1 and 1 -> 2


_MOE = dict(num_experts=4, hidden=34, heads=2, ffn=65, bucket_size=1500, overlap_grad_reduce=False)
EP2 = MegatronSpec(dp=2, ep=2, **_MOE)
EP1 = MegatronSpec(dp=2, ep=1, **_MOE)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("round_trip_moe")
    return {spec.ep: (spec, save_real_checkpoint(root / f"ep{spec.ep}", spec, steps=2)) for spec in (EP2, EP1)}


@pytest.mark.parametrize("source_ep,ms_ep", [(2, 1), (1, 2)], ids=["ep2->1", "ep1->2"])
def test_moe_round_trip_through_another_expert_parallel_size(moe_runs, tmp_path, source_ep, ms_ep):
    spec, run = moe_runs[source_ep]
    ms = tmp_path / "ms"
    to_mindspore(ms, "--megatron-path", run.path, "--dp-size", spec.dp, "--ms-ep-size", ms_ep)
    back(ms, tmp_path / "back", *size_flags(1, 1, dp=spec.dp, ep=spec.ep))
    assert_round_trip(tmp_path / "back", run.path.parent, lambda _: megatron_ranges(run.state, spec))


def test_mindspeeds_two_groups_at_ep_1_come_back_into_the_experts_groups_at_ep_2(moe_runs, tmp_path):
    """At ep 1 MindSpeed-Core-MS holds the experts in its two weight-decay groups (its set_weight_decay
    keys by wd_mult and lr_mult alone: mindspeed_ms/training/utils.py:29-67 at 697e48e), so the ep 2
    source's four groups become two; learning rates MindSpore changes there come back into the dense
    and the expert optimizer's group of the same weight-decay kind."""
    import mindspore as ms_api
    spec, run = moe_runs[2]
    ms = tmp_path / "ms"
    to_mindspore(ms, "--megatron-path", run.path, "--dp-size", spec.dp, "--ms-ep-size", 1)
    lr = {0: 1.25e-4, 1: 5.0e-4}  # group 0's is mindspore_train_step's own
    wd_mult = {}
    for path in sorted(ms.glob("rank_*/*.ckpt")):
        scalars = {k: v.asnumpy() for k, v in ms_api.load_checkpoint(str(path)).items() if "_group_" in k}
        assert sorted(k for k in scalars if k.startswith("learning_rate_group_")) == \
            ["learning_rate_group_0", "learning_rate_group_1"], path
        wd_mult.update({float(scalars[f"wd_mult_group_{i}"]): i for i in lr})
        mindspore_train_step(path, "ckpt", step=5, extra={"learning_rate_group_1": lr[1]})
    assert sorted(wd_mult) == [0.0, 1.0]
    back(ms, tmp_path / "back", *size_flags(1, 1, dp=spec.dp, ep=spec.ep))
    folders = sorted((tmp_path / "back" / "iter_0000005").glob("mp_rank_*"))
    assert len(folders) == 2
    for folder in folders:
        dense, experts = (part["optimizer"]["param_groups"]
                          for part in torch.load(folder / "model_optim_rng.pt", weights_only=False)["optimizer"])
        assert len(experts) == 2 and all(g["is_expert_parallel"] for g in experts), folder.name
        for group in dense + experts:
            assert group["lr"] == float(np.float32(lr[wd_mult[group["wd_mult"]]])), (folder.name, group["wd_mult"])


# ---------------------------------------------------------------------------------------------
# The way back at a third layout loads into real Megatron


SOURCE = MegatronSpec(tp=2, pp=2, dp=1, num_layers=2, ffn=64, overlap_grad_reduce=False)
THIRD = MegatronSpec(tp=2, pp=1, dp=1, num_layers=2, ffn=64, overlap_grad_reduce=False)
SPLIT_DIM = {"word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0, "linear_qkv.bias": 0,
             "linear_fc1.weight": 0, "linear_fc1.bias": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def global_state(dump: dict, spec: MegatronSpec) -> dict[tuple[str, str], torch.Tensor]:
    """(name with global layer number, state) -> the whole tensor from a real-Megatron dump: tp shards
    joined on their split axis (mcore local spec), replicated ones checked equal, the tied head copy
    of the last stage left out."""
    per_stage = spec.num_layers // spec.pp
    shards: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, entry in dump["params"].items():
        tp, pp, name = re.fullmatch(r"tp(\d+)/pp(\d+)/chunk\d+/(.*)", key).groups()
        if name == "output_layer.weight" and not spec.untie_embeddings:
            continue
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + int(pp) * per_stage}.", name)
        for state in (*STATES, "model"):
            shards.setdefault((name, state), {})[int(tp)] = entry[state]
    out = {}
    for (name, state), by_tp in shards.items():
        parts = [by_tp[t] for t in range(spec.tp)]
        dim = next((d for suffix, d in SPLIT_DIM.items() if name.endswith(suffix)), None)
        if dim is None:
            assert all(p.view(torch.uint8).equal(parts[0].view(torch.uint8)) for p in parts), (name, state)
        out[(name, state)] = parts[0] if dim is None else torch.cat(parts, dim)
    return out


def test_way_back_at_a_third_layout_loads_into_megatron_with_the_global_state(tmp_path):
    """A at tp 2 . pp 2 -> MindSpore at tp 1 . pp 1 -> Megatron at tp 2 . pp 1: Megatron's own
    load_checkpoint + load_parameter_state accept it and hold A's global state, bit for bit."""
    run = save_real_checkpoint(tmp_path / "save", SOURCE, steps=2)
    ms = tmp_path / "ms"
    to_mindspore(ms, "--megatron-path", run.path, *size_flags(SOURCE.tp, SOURCE.pp), "--ms-tp-size", 1,
                 "--ms-pp-size", 1)
    back(ms, tmp_path / "back", *size_flags(THIRD.tp, THIRD.pp))
    got, want = global_state(dump_loaded_state(tmp_path / "back", THIRD), THIRD), global_state(run.state, SOURCE)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert got[key].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), key
