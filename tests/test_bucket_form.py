"""MindSpeed-Core-MS's DistributedOptimizer checkpoints (the bucket form) read by the way back.

Two independent records: the samples written by mindspeed_ms's own save path (../shared/mindspeed_distopt,
with `_expected/` tensors and ranges read from the live optimizer), and tests/mindspeed_bucket_fixture.py,
which builds the form from the layout rules (and is first checked to reproduce the samples' JSON).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ms_convert.ckpt2pt import build_parser, main as ckpt2pt_main, options_from_args
from megatron_ms_convert.ckpt2pt_facts import pick_ms_file, read_rank_meta, read_source
from megatron_ms_convert.errors import ConvertInputError
from megatron_ms_convert.megatron.checkpoint import load_pt, megatron_enum_importable
from megatron_ms_convert.mindspore.bucket_form import open_bucket_form, rank_source
from megatron_ms_convert.mindspore.reader import open_mindspore_file
from megatron_ms_convert.mindspore.writer import TensorEntry, write_mindspore_file
from tests.megatron_fixture import FixtureSpec, write_fixture
from tests.mindspeed_bucket_fixture import build_layout, layout_json, write_bucket_form
from tests.test_ckpt2pt import assert_refused, back_flags, in_process, successes, to_ms

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "mindspeed_distopt"
if not SAMPLES.is_dir():
    SAMPLES = Path("/work/shared/mindspeed_distopt")
SAMPLE_NAMES = {"tp2dp2_fp32_4buckets": 1500, "tp1dp2_bf16_2buffers": 3000}  # sample -> its bucket_size
MS_DTYPES = {"Float32": "float32", "BFloat16": "bfloat16"}


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module", params=sorted(SAMPLE_NAMES))
def sample(request, tmp_path_factory):
    if not SAMPLES.is_dir():
        pytest.fail(f"the mindspeed_ms samples are not at {SAMPLES}")
    name = request.param
    root = writable_copy(SAMPLES / name, tmp_path_factory.mktemp(name) / name)
    return name, root, SAMPLES / f"{name}_expected"


def groups_of(root: Path) -> list[int]:
    """dp-rank-0 ranks: the ones whose layout JSON is there."""
    return sorted(int(p.parent.name.split("_")[1]) for p in root.glob("opt_shard_info/rank_*/*.json"))


def open_group(root: Path, rank: int, **kw):
    path, bucket = rank_source(root / f"rank_{rank}", root, "ckpt", None, None, pick_ms_file, **kw)
    assert bucket is not None
    return open_bucket_form(bucket, "ckpt")


def bits(t) -> np.ndarray:
    return np.ascontiguousarray(t).view(np.uint32)


def test_every_parameter_and_moment_of_every_rank_is_the_samples(sample):
    name, root, expected = sample
    ranks_checked = 0
    for rank in groups_of(root):
        with open_group(root, rank) as group:
            read = {n: group.read(n).numpy() for n in group.names() if "." in n}
            for member in group.layout.dp_ranks:
                want = np.load(expected / f"rank_{member}.npz")
                assert sorted(read) == sorted(want.keys())
                for key in want.keys():
                    assert read[key].shape == want[key].shape and read[key].dtype == np.float32, key
                    assert np.array_equal(bits(read[key]), bits(want[key])), f"{name} rank {member} {key}"
                ranks_checked += 1
    assert ranks_checked == len(list(root.glob("rank_*")))


def test_the_layout_is_the_ranges_mindspeed_built(sample):
    """Each dp rank's segments are exactly the range_in_param / range_in_shard of the live optimizer."""
    name, root, expected = sample
    for rank in groups_of(root):
        with open_group(root, rank) as group:
            for d, member in enumerate(group.layout.dp_ranks):
                record = json.loads((expected / f"rank_{member}.json").read_text())
                mine = {p.name: s for p in group.layout.params for s in p.segments if s.dp == d}
                want = {n: r for n, r in record["ranges"].items()}
                assert sorted(mine) == sorted(want), (name, member)
                for pname, seg in mine.items():
                    r = want[pname]
                    assert [seg.start, seg.start + seg.length] == r["range_in_param"], (pname, r)
                    assert [seg.offset, seg.offset + seg.length] == r["range_in_shard"], (pname, r)
                sizes = {key: n for key, n in group.layout.shard_numel}
                views = {(b, k): hi - lo for b, k, lo, hi in record["views"]}
                assert sizes == views


def test_the_fixture_builder_reproduces_the_samples_layout_json(sample):
    """The builder of the round-trip tests follows mindspeed_ms's rules: it makes the samples' JSON."""
    name, root, expected = sample
    for rank in groups_of(root):
        saved = json.loads(next((root / "opt_shard_info" / f"rank_{rank}").glob("*.json")).read_text())
        record = json.loads((expected / f"rank_{rank}.json").read_text())
        params = [(n, tuple(shape), MS_DTYPES[d]) for n, shape, d in record["model_params"]]
        assert layout_json(build_layout(params, 2, SAMPLE_NAMES[name], True), saved["dp_rank_list"]) == saved


def test_parameters_inside_one_shard_are_views_of_the_mapping(sample):
    """No copy for a parameter held by one dp rank (a write into it shows in the next read of the same
    open file: the private mapping), a tensor of its own for one split between two dp ranks."""
    _, root, _ = sample
    with open_group(root, 0) as group:
        whole = [p for p in group.layout.params if len(p.segments) == 1]
        split = [p for p in group.layout.params if len(p.segments) > 1]
        assert whole and split
        for place in (whole[0], split[0]):
            for prefix in ("", "exp_avg.", "exp_avg_sq."):
                tensor = group.read(prefix + place.name)
                before = tensor.reshape(-1)[0].item()
                tensor.reshape(-1)[0] = before + 1
                again = group.read(prefix + place.name).reshape(-1)[0].item()
                assert again == (before + 1 if place is whole[0] else before), (place.name, prefix)


# ---------------------------------------------------------------------------------------------
# Refusals of the reader (samples)


def refusal(root: Path, rank: int = 0, **kw) -> str:
    with pytest.raises(ConvertInputError) as err:
        with open_group(root, rank, **kw):
            pass
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_json_with_a_stale_tail_is_refused(sample, tmp_path):
    _, src, _ = sample
    root = writable_copy(src, tmp_path / "s")
    json_path = next((root / "opt_shard_info" / "rank_0").glob("*.json"))
    json_path.write_text(json_path.read_text() + '\n        }\n    }\n}')  # what a shorter rewrite leaves
    message = refusal(root)
    assert str(json_path) in message and "Extra data" in message and "--opt-shard-info" in message


def test_a_json_of_another_layout_is_refused(sample, tmp_path):
    _, src, _ = sample
    root = writable_copy(src, tmp_path / "s")
    json_path = next((root / "opt_shard_info" / "rank_0").glob("*.json"))
    info = json.loads(json_path.read_text())
    bucket = info["buffer_info"]["0"]["buckets"]["0"]
    bucket[0] += 256
    info["buffer_info"]["0"]["buffer_size"] += 256
    json_path.write_text(json.dumps(info))
    message = refusal(root)
    assert "buffer 0 bucket 0" in message and "buffer_0_bucket_0" in message and "--opt-shard-info" in message


def test_mixed_saves_are_refused_naming_ranks_and_steps(sample, tmp_path):
    _, src, _ = sample
    root = writable_copy(src, tmp_path / "s")
    member = json.loads(next((root / "opt_shard_info" / "rank_0").glob("*.json")).read_text())["dp_rank_list"][1]
    [path] = (root / f"rank_{member}").glob("*.ckpt")
    path.rename(path.with_name(f"network_rank_{member}-0_7.ckpt"))
    message = refusal(root)
    assert f"network_rank_{member}-0_3.ckpt: missing" in message and "0_7" in message
    # the right file name, another step inside
    with open_mindspore_file(path.with_name(f"network_rank_{member}-0_7.ckpt")) as ms:
        data = {n: ms.read(n).numpy().copy() for n in ms.names()}
        entries = [TensorEntry(n, ms.info(n).shape, ms.info(n).dtype) for n in ms.names()]
    data["step_num"] = np.array(7, np.int64)
    write_mindspore_file(path, entries, lambda e: data[e.name])
    message = refusal(root)
    assert "rank 0 epoch 0 step 3" in message and f"rank {member} epoch 0 step 7" in message


def test_a_bucket_form_without_its_json_names_the_form_and_the_flag(sample, tmp_path):
    _, src, _ = sample
    root = writable_copy(src, tmp_path / "s")
    shutil.move(root / "opt_shard_info", tmp_path / "elsewhere")
    with pytest.raises(ConvertInputError) as err:
        rank_source(root / "rank_0", root, "ckpt", None, None, pick_ms_file)
    assert "bucket form" in str(err.value) and "--opt-shard-info" in str(err.value)
    path, bucket = rank_source(root / "rank_0", root, "ckpt", None, tmp_path / "elsewhere", pick_ms_file)
    assert bucket.layout_json.parent.parent == tmp_path / "elsewhere"


def test_zero3_parameters_are_refused(sample, tmp_path):
    _, src, _ = sample
    root = writable_copy(src, tmp_path / "s")
    json_path = next((root / "opt_shard_info" / "rank_0").glob("*.json"))
    info = json.loads(json_path.read_text())
    info["zero3_params"] = {"language_model.encoder.layers.0.mlp.mapping.weight": [0, 320]}
    json_path.write_text(json.dumps(info))
    assert "zero3" in refusal(root)


def test_a_group_of_another_dp_size_is_refused(sample):
    _, root, _ = sample
    with pytest.raises(ConvertInputError, match="--ms-dp-size 2"):
        rank_source(root / "rank_0", root, "ckpt", None, None, pick_ms_file, group_size=4)


def test_the_sample_without_pt_meta_stops_on_the_missing_record(sample, tmp_path):
    """mindspeed_ms's own saves have no Megatron origin: the way back needs a pt_meta to rebuild Megatron's
    files, and says so (reading them is what the tests above show)."""
    name, root, _ = sample
    (tmp_path / "pt_meta").mkdir()
    out = tmp_path / "out"
    proc = in_process(ckpt2pt_main, "--ms-path", root, "--param-map-path", tmp_path / "pt_meta",
                      "--megatron-path", out, *back_flags(tp=2 if name.startswith("tp2") else 1, dp=2))
    assert_refused(proc, out, "args_tp00_pp000.pt", "pt_meta")


# ---------------------------------------------------------------------------------------------
# Round trip: our pt2ckpt output -> bucket form -> our ckpt2pt == our pt2ckpt output -> our ckpt2pt

EVEN = FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, hidden=24, ffn=52, heads=2, vocab=61, overlap_grad_reduce=True,
                   bucket_size=300)  # every parameter of even size: no bucket has an odd tail without mem align
ODD = FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, hidden=20, ffn=38, heads=2, vocab=97, overlap_grad_reduce=True,
                  bucket_size=300)  # ffn / tp = 19: odd biases
SIZES = dict(tp=2, pp=2, dp=2)
RUN_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """Megatron fixture -> our pt2ckpt (named form) -> our ckpt2pt: the reference."""
    root = tmp_path_factory.mktemp("named")
    out = {}
    for label, spec in (("even", EVEN), ("odd", ODD)):
        fixture = write_fixture(root / label / "megatron", spec)
        ms = root / label / "ms"
        to_ms(fixture.megatron_path, ms, ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2])
        back = root / label / "back"
        proc = in_process(ckpt2pt_main, "--ms-path", ms, "--param-map-path", ms / "pt_meta", "--megatron-path",
                          back, *back_flags(**SIZES))
        assert proc.returncode == 0, proc.stdout
        out[label] = (spec, ms, back)
    return out


def convert_back(ms: Path, pt_meta: Path, out: Path, *extra):
    return in_process(ckpt2pt_main, "--ms-path", ms, "--param-map-path", pt_meta, "--megatron-path", out,
                      *back_flags(**SIZES), *extra)


def assert_same_files(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.pt"))
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    tracker = "latest_checkpointed_iteration.txt"
    assert (a / tracker).read_text() == (b / tracker).read_text()
    return len(files)


@pytest.mark.parametrize("mem_align", [True, False], ids=["mem_align", "no_mem_align"])
def test_the_bucket_form_adds_no_difference(named, tmp_path, mem_align):
    spec, ms, reference = named["even"]
    # with mem align, the position embedding kept fp32 as in the bf16 sample: two buffers
    with open_mindspore_file(ms / "rank_0" / "network.ckpt") as first:
        fp32 = tuple(n for n in first.names() if n.startswith("language_model.embedding.position")) if mem_align \
            else ()
    assert len(fp32) == 1 or not mem_align
    built = write_bucket_form(ms, tmp_path / "bucket", 2, 2, 2, 300, mem_align, RUN_DTYPE[spec.dtype], fp32)
    assert all(sum(len(b) for b in layout.buckets) >= 2 for layout in built.values())
    assert any(len(layout.buckets) == 2 for layout in built.values()) == mem_align
    assert len(list((tmp_path / "bucket").glob("rank_*"))) == 8
    proc = convert_back(tmp_path / "bucket", ms / "pt_meta", tmp_path / "out", "--verify")
    assert proc.returncode == 0, proc.stdout
    assert "bucket form" in proc.stdout and successes(proc) == 4
    assert assert_same_files(reference, tmp_path / "out") == 8


def test_the_tail_without_mem_align_is_refused(named, tmp_path):
    spec, ms, _ = named["odd"]
    built = write_bucket_form(ms, tmp_path / "bucket", 2, 2, 2, 300, False, RUN_DTYPE[spec.dtype])
    odd = [(rank, b, k) for rank, layout in built.items() for b, buckets in enumerate(layout.buckets)
           for k, (n, _) in enumerate(buckets) if n % 2]
    assert odd, "the fixture should have a bucket with an odd element count"
    out = tmp_path / "out"
    assert_refused(convert_back(tmp_path / "bucket", ms / "pt_meta", out), out, "element(s) of",
                   "are in no shard", "enable_mem_align")


def test_a_folder_holding_both_forms_needs_ms_form(named, tmp_path):
    """combine_ckpt_dp_zero.py in place: a newer named file beside the bucket file meta.json names."""
    spec, ms, reference = named["even"]
    bucket = tmp_path / "bucket"
    write_bucket_form(ms, bucket, 2, 2, 2, 300, True, RUN_DTYPE[spec.dtype])
    for rank in (0, 1, 4, 5):
        target = bucket / f"rank_{rank}" / f"network_rank_{rank}-0_10_dp_merged.ckpt"
        shutil.copy(ms / f"rank_{rank}" / "network.ckpt", target)
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    out = tmp_path / "out"
    assert_refused(convert_back(bucket, ms / "pt_meta", out), out, "holds both forms", "--ms-form")
    for form in ("bucket", "named"):
        proc = convert_back(bucket, ms / "pt_meta", tmp_path / form, "--ms-form", form)
        assert proc.returncode == 0, proc.stdout
        assert ("bucket form" in proc.stdout) == (form == "bucket")
        assert_same_files(reference, tmp_path / form)


def test_cli_refusals_write_nothing(named, tmp_path):
    spec, ms, _ = named["even"]
    bucket = tmp_path / "bucket"
    write_bucket_form(ms, bucket, 2, 2, 2, 300, True, RUN_DTYPE[spec.dtype])
    json_path = bucket / "opt_shard_info" / "rank_4" / "dist_opt_shard_info_rank_4-0_0.json"
    text = json_path.read_text()
    cases = {
        "stale tail": (lambda: json_path.write_text(text + "\n}\n}"), ("Extra data", str(json_path))),
        "other layout": (lambda: json_path.write_text(text.replace('"buffer_size": ', '"buffer_size": 1')),
                         ("add up to", str(json_path))),
        "no json": (lambda: json_path.unlink(), ("bucket form", "--opt-shard-info")),
        "other step": (lambda: (bucket / "rank_6" / "network_rank_6-0_10.ckpt").rename(
            bucket / "rank_6" / "network_rank_6-0_12.ckpt"), ("network_rank_6-0_10.ckpt: missing", "0_12")),
    }
    for label, (damage, needles) in cases.items():
        damage()
        out = tmp_path / label.replace(" ", "_")
        assert_refused(convert_back(bucket, ms / "pt_meta", out), out, *needles)
        json_path.write_text(text)
        if not (bucket / "rank_6" / "network_rank_6-0_10.ckpt").exists():
            (bucket / "rank_6" / "network_rank_6-0_12.ckpt").rename(bucket / "rank_6" / "network_rank_6-0_10.ckpt")
    out = tmp_path / "dp1"
    assert_refused(convert_back(bucket, ms / "pt_meta", out, "--ms-dp-size", 1), out, "--ms-dp-size 2")


def test_a_moe_runs_bucket_form_is_refused(named, tmp_path):
    """mindspeed_ms hands only the dense buffers to its DistributedOptimizer: experts are not in this form."""
    spec, ms, _ = named["even"]
    bucket = tmp_path / "bucket"
    write_bucket_form(ms, bucket, 2, 2, 2, 300, True, RUN_DTYPE[spec.dtype])
    meta = load_pt(ms / "pt_meta" / "args_tp00_pp000.pt")
    meta["num_local_experts"] = 2
    with megatron_enum_importable():
        torch.save(meta, tmp_path / "args_tp00_pp000.pt")
    rank = read_rank_meta(tmp_path / "args_tp00_pp000.pt", True, 0, 0, 1)
    options = options_from_args(build_parser().parse_args([
        "--ms-path", str(bucket), "--param-map-path", str(ms / "pt_meta"), "--megatron-path", str(tmp_path / "o"),
        *map(str, back_flags(**SIZES))]))
    with pytest.raises(ConvertInputError, match="expert"):
        read_source(options, 0, rank)
    assert read_source(options, 0, read_rank_meta(ms / "pt_meta" / "args_tp00_pp000.pt", True, 0, 0, 1))[1]


def test_a_file_without_parameters_says_what_it_holds(named, tmp_path):
    """The message for a file the way back cannot use names what it found, and suggests
    --convert-param-only only when just moments are missing."""
    _, ms, _ = named["even"]
    copy = writable_copy(ms, tmp_path / "ms")
    target = copy / "rank_0" / "network.ckpt"
    with open_mindspore_file(target) as f:
        keep = [n for n in f.names() if "." not in n]
        data = {n: f.read(n).numpy().copy() for n in keep}
        entries = [TensorEntry(n, f.info(n).shape, f.info(n).dtype) for n in keep]
    target.unlink()
    write_mindspore_file(target, entries, lambda e: data[e.name])
    out = tmp_path / "out"
    proc = convert_back(copy, ms / "pt_meta", out)
    assert_refused(proc, out, str(target), f"found 0 parameters and moments (only {len(keep)} scalars: ")
    assert "--convert-param-only" not in proc.stdout


def layout_info(buckets: list[int], params: dict) -> dict:
    return {"dp_rank_list": [0, 1], "param_info": params,
            "buffer_info": {"0": {"buckets": {str(k): [n, n] for k, n in enumerate(buckets)},
                                  "buffer_size": sum(buckets), "bucket_num": len(buckets)}}}


def test_the_plan_is_checked_without_tensor_data():
    """plan_layout works from the JSON and the headers' shard sizes alone (no file is opened)."""
    from megatron_ms_convert.mindspore.bucket_form import Segment, plan_layout
    info = layout_info([6, 7], {"b": {"range_map": [0, 0, 0, 6], "shape": [2, 3]},
                                "a": {"range_map": [0, 1, 6, 13], "shape": [7]}})
    with pytest.raises(ConvertInputError, match=r"1 element\(s\) of a are in no shard"):
        plan_layout(info, Path("j.json"), {(0, 0): 3, (0, 1): 3}, Path("f.ckpt"))
    with pytest.raises(ConvertInputError, match="buffer_0_bucket_1 of 3 elements"):
        plan_layout(info, Path("j.json"), {(0, 0): 3, (0, 1): 4}, Path("f.ckpt"))
    info = layout_info([6, 8], {"b": {"range_map": [0, 0, 0, 6], "shape": [2, 3]},
                                "a": {"range_map": [0, 1, 6, 13], "shape": [7]}})
    layout = plan_layout(info, Path("j.json"), {(0, 0): 3, (0, 1): 4}, Path("f.ckpt"))
    assert [p.segments for p in layout.params] == [
        (Segment(0, 0, 0, 3), Segment(3, 1, 0, 3)), (Segment(0, 0, 0, 4), Segment(4, 1, 0, 3))]


def test_the_bucket_form_in_safetensors(named, tmp_path):
    """mindspeed_ms saves with format=safetensors too: the same files come back as from the named files."""
    spec = named["even"][0]
    ms = tmp_path / "ms"
    to_ms(write_fixture(tmp_path / "megatron", spec).megatron_path, ms,
          ["--tp-size", 2, "--pp-size", 2, "--dp-size", 2, "--format", "safetensors"])
    flags = ("--src-model-format", "safetensors")
    assert convert_back(ms, ms / "pt_meta", tmp_path / "reference", *flags).returncode == 0
    write_bucket_form(ms, tmp_path / "bucket", 2, 2, 2, 300, True, RUN_DTYPE[spec.dtype], fmt="safetensors")
    assert list((tmp_path / "bucket").glob("rank_*/*.safetensors"))
    proc = convert_back(tmp_path / "bucket", ms / "pt_meta", tmp_path / "out", *flags)
    assert proc.returncode == 0, proc.stdout
    assert "bucket form" in proc.stdout
    assert assert_same_files(tmp_path / "reference", tmp_path / "out") == 8
