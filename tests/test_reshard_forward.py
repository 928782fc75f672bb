"""Re-sharding on the way there, end to end: Megatron-format checkpoints written by the fixture
generator (index-valued: every element unique, with a record of every value) converted with the
--ms-* flags, the outputs read with the real `mindspore.load_checkpoint`, and the global state of
every parameter (fp32 master, exp_avg, exp_avg_sq) assembled from them by this test's own rules
(RESHARDING.md §1, written out here, not the converter's) compared bit for bit with the global state
assembled from the fixture's record. Output names are checked against what MindSpeed-Core-MS's model
loads at the target layout (tests/mindspeed_model_facts.py).

The fixture's replicated copies differ by construction (distinct codes per tp rank), so conversions
run with --replica-policy first and the global replicated tensor is tp rank 0's; the default (check
equal) is shown to stop on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ms_convert.pt2ckpt import main as convert_main
from tests.expected_outputs import load_record, ms_name
from tests.helpers import error_lines, in_process
from tests.megatron_fixture import FixtureSpec, write_fixture
from tests.mindspeed_model_facts import MindSpeedStage, check_rank_names

STATES = ("param", "exp_avg", "exp_avg_sq")
EMBEDDING = "language_model.embedding.word_embeddings.weight"
HEAD = "language_model.output_layer.weight"

# legacy: LayerNorm, learned positions, tied; mcore: Transformer Engine spec, RMSNorm, rope, untied.
# 4 heads / ffn 40 / 56 padded vocab rows (vocab 50, divisor 4) split over tp 1, 2 and 4.
_DIMS = dict(hidden=16, heads=4, ffn=40, vocab=50, make_vocab_size_divisible_by=4, seq_length=8, dp=1)
SOURCES = {
    "legacy-tp2pp2": FixtureSpec(tp=2, pp=2, num_layers=4, **_DIMS),
    "legacy-tp1pp1": FixtureSpec(tp=1, pp=1, num_layers=4, make_vocab_size_divisible_by=8,
                                 **{k: v for k, v in _DIMS.items() if k != "make_vocab_size_divisible_by"}),
    "mcore-pp4vpp2": FixtureSpec(tp=1, pp=4, vpp=2, num_layers=8, model="mcore", mcore_spec="te",
                                 normalization="RMSNorm", position_embedding="rope", untie_embeddings=True,
                                 make_vocab_size_divisible_by=8,
                                 **{k: v for k, v in _DIMS.items() if k != "make_vocab_size_divisible_by"}),
    "mcore-tp2pp4": FixtureSpec(tp=2, pp=4, num_layers=4, model="mcore", mcore_spec="te",
                                normalization="RMSNorm", position_embedding="rope", untie_embeddings=True, **_DIMS),
}

# (source, --ms-* flags): target (tp, pp, vpp, stage list)
CASES = [
    ("legacy-tp2pp2", dict(tp=1)),  # tp 2 -> 1
    ("legacy-tp1pp1", dict(tp=2)),  # tp 1 -> 2
    ("legacy-tp2pp2", dict(tp=4)),  # tp 2 -> 4
    ("legacy-tp2pp2", dict(pp=1)),  # pp 2 -> 1: the tied copy dropped
    ("legacy-tp1pp1", dict(pp=2)),  # pp 1 -> 2: the tied copy created from the embedding
    ("mcore-pp4vpp2", dict(pp=1)),  # pp 4 . vpp 2 -> pp 1 (Megatron needs pp > 2 for vpp)
    ("mcore-tp2pp4", dict(pp=2)),  # pp 4 -> 2
    ("legacy-tp2pp2", dict(pp=3, stage_list=(1, 2, 1))),  # an uneven --ms-stage-list
    ("legacy-tp2pp2", dict(tp=1, pp=4)),  # tp 2 . pp 2 -> tp 1 . pp 4
    ("mcore-pp4vpp2", dict(tp=2, pp=2, vpp=2)),  # vpp kept, stages and tp changed
]


def _case_id(case):
    source, target = case
    return source + "->" + ".".join(f"{k}{'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
                                    for k, v in target.items())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_sources")
    return {name: write_fixture(root / name, spec) for name, spec in SOURCES.items()}


def ms_flags(target: dict) -> list[str]:
    flags = []
    for key in ("tp", "pp", "vpp"):
        if key in target:
            flags += [f"--ms-{key}-size", str(target[key])]
    if "stage_list" in target:
        flags += ["--ms-stage-list", *map(str, target["stage_list"])]
    return flags


def convert(fx, out: Path, *extra):
    return in_process(convert_main, *fx.convert_flags(), "--ms-path", out, *extra)


def convert_resharded(fx, out: Path, target: dict):
    """Convert at the target layout, taking tp rank 0's replicated copies (the fixture's differ), in one
    process (so that the log has the workers' lines too)."""
    proc = convert(fx, out, *ms_flags(target), "--replica-policy", "first", "--multiprocess-off")
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------
# The test's own rules: how a MindSpore-named parameter is split over tp, and global tensors


def split_dim(name: str) -> int | None:
    """RESHARDING.md §1.2, by MindSpore name: vocab rows, qkv groups, fc1 rows on dim 0; the
    row-parallel weights on dim 1; everything else replicated. (No SwiGLU in these fixtures.)"""
    if name.endswith((EMBEDDING, HEAD, "qkv_proj.weight", "qkv_proj.bias", "mapping.weight", "mapping.bias")):
        return 0
    if name.endswith(("out_proj.weight", "projection.weight")):
        return 1
    return None


def merge(shards: dict[int, np.ndarray], name: str, check_replicas: bool) -> np.ndarray:
    ordered = [shards[r] for r in sorted(shards)]
    dim = split_dim(name)
    if dim is None:
        if check_replicas:
            for other in ordered[1:]:
                assert other.tobytes() == ordered[0].tobytes(), f"{name}: replicated copies differ in the output"
        return ordered[0]
    return np.concatenate(ordered, axis=dim)


def source_globals(record, merge=merge) -> tuple[dict, dict]:
    """(MindSpore name -> {state: global array}) of the source, and the tied head copy's (if any);
    `merge(shards by tp rank, name, check_replicas)` joins a parameter's tp shards."""
    shards: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    copy: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for entry in record.params:
        name = ms_name(entry["name_global_layer"], record.meta)
        is_copy = name == HEAD and not record.meta["untie_embeddings"]
        for state in STATES:
            array = record.tensors[f"{entry['key']}::{state}"].float().numpy()
            (copy if is_copy else shards).setdefault((name, state), {})[entry["tp"]] = array
    glob = {}
    for (name, state), by_tp in shards.items():
        glob.setdefault(name, {})[state] = merge(by_tp, name, check_replicas=False)
    head_copy = {}
    for (name, state), by_tp in copy.items():
        head_copy[state] = merge(by_tp, name, check_replicas=False)
    return glob, head_copy


def target_stage_lists(spec: FixtureSpec, target: dict) -> tuple[int, int, tuple[int, ...] | None]:
    pp = target.get("pp", spec.pp)
    vpp = target.get("vpp", spec.vpp if "pp" not in target else 1)
    return pp, vpp, target.get("stage_list")


def load_outputs(out: Path, spec: FixtureSpec, target: dict) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(tp, pp) -> that target rank's file, loaded with MindSpore (dp = cp = 0)."""
    import mindspore as ms
    tp = target.get("tp", spec.tp)
    pp, _, _ = target_stage_lists(spec, target)
    files = {}
    for p in range(pp):
        for t in range(tp):
            rank = p * spec.dp * spec.cp * tp + t  # tp-cp-ep-dp-pp with the target's tp
            loaded = ms.load_checkpoint(str(out / f"rank_{rank}" / "network.ckpt"))
            files[(t, p)] = {name: value.asnumpy() for name, value in loaded.items()}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("rank_")) == sorted(
        f"rank_{p * tp + t}" for p in range(pp) for t in range(tp))
    return files


def output_globals(files: dict, tp: int, merge=merge) -> dict:
    by_name: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for (t, _), tensors in files.items():
        for full, array in tensors.items():
            state, name = next(((s, full[len(s) + 1:]) for s in STATES[1:] if full.startswith(s + ".")),
                               ("param", full))
            if array.ndim == 0 or not name.startswith("language_model."):
                continue  # scalars
            assert (name, state) not in by_name or t not in by_name[(name, state)], f"{name} on two stages"
            by_name.setdefault((name, state), {})[t] = array
    glob = {}
    for (name, state), shards in by_name.items():
        assert sorted(shards) == list(range(tp)), (name, sorted(shards))
        glob.setdefault(name, {})[state] = merge(shards, name, check_replicas=True)
    return glob


def mindspeed_stages(spec: FixtureSpec, target: dict, pp_rank: int) -> list[MindSpeedStage]:
    pp, vpp, stage_list = target_stage_lists(spec, target)
    return [MindSpeedStage(num_layers=spec.num_layers, pp=pp, pp_rank=pp_rank, vpp=vpp, chunk=chunk,
                           normalization=spec.normalization,
                           learned_position_embeddings=spec.position_embedding == "learned_absolute",
                           untied=spec.untie_embeddings, num_layer_list=stage_list)
            for chunk in range(vpp)]


# ---------------------------------------------------------------------------------------------
# Global state identity


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_global_state_identity(case, sources, tmp_path):
    source_name, target = case
    fx = sources[source_name]
    spec = fx.spec
    out = tmp_path / "ms"
    proc = convert_resharded(fx, out, target)
    # the fixture's tied copy has its own values: dropping it is worth a warning per source tp rank
    dropped = not spec.untie_embeddings and spec.pp > 1 and target.get("pp", spec.pp) == 1
    assert proc.stdout.count("differs from the first stage's embedding") == (spec.tp if dropped else 0)
    record = load_record(fx.root)
    want, head_copy = source_globals(record)
    tp = target.get("tp", spec.tp)
    pp, _, _ = target_stage_lists(spec, target)
    files = load_outputs(out, spec, target)
    got = output_globals(files, tp)

    if not spec.untie_embeddings and pp > 1:  # the target's tied copy: the source's copy, or its embedding
        want[HEAD] = head_copy if head_copy else want[EMBEDDING]
    assert sorted(got) == sorted(want)
    for name in want:
        for state in STATES:
            assert got[name][state].dtype == np.float32
            assert got[name][state].shape == want[name][state].shape, (name, state)
            assert got[name][state].tobytes() == want[name][state].tobytes(), (name, state)

    # index-valued: the outputs are a bijection onto the source's elements (replicas: tp rank 0's; the
    # tied copy's own elements only where the target keeps a copy), the three states moving together
    values = np.concatenate([got[name]["param"].ravel() for name in sorted(got)
                             if not (name == HEAD and not spec.untie_embeddings and not head_copy)])
    assert len(np.unique(values)) == len(values)
    for name in got:
        np.testing.assert_array_equal(got[name]["exp_avg"], -got[name]["param"])
        np.testing.assert_array_equal(got[name]["exp_avg_sq"], got[name]["param"] + np.float32(0.5))

    # names: exactly what MindSpeed-Core-MS's model loads at the target layout; weight decay per rank
    for (t, p), tensors in files.items():
        scalars = {n for n, a in tensors.items() if a.ndim == 0 or not n.split(".", 1)[-1].startswith("language_")}
        check_rank_names(set(tensors), mindspeed_stages(spec, target, p), scalars)
        first_is_embedding = p == 0
        assert tensors["weight_decay_group_0"] == np.float32(0.1 if first_is_embedding else 0.0), (t, p)
        assert tensors["weight_decay_group_1"] == np.float32(0.0 if first_is_embedding else 0.1), (t, p)
        assert tensors["step_num"] == spec.iteration

    layout = json.loads((out / "pt_meta" / "layout.json").read_text())
    assert layout["target"]["tp"] == tp and layout["target"]["pp"] == pp
    assert sorted(p.name for p in (out / "pt_meta").glob("args_*.pt")) == sorted(
        f"args_tp{t:02d}_pp{p:03d}.pt" for t in range(spec.tp) for p in range(spec.pp))


def test_replicated_copies_must_agree_by_default(sources, tmp_path):
    proc = convert(sources["legacy-tp2pp2"], tmp_path / "ms", "--ms-tp-size", "1")
    assert proc.returncode == 1
    assert any("replicated copies" in line and "--replica-policy" in line for line in error_lines(proc))


def test_replica_policy_mean(sources, tmp_path):
    fx = sources["legacy-tp2pp2"]
    out = tmp_path / "ms"
    assert convert(fx, out, "--ms-tp-size", "1", "--ms-pp-size", "1", "--replica-policy", "mean").returncode == 0
    record = load_record(fx.root)
    got = load_outputs(out, fx.spec, dict(tp=1, pp=1))[(0, 0)]
    name = "language_model.encoder.layers.0.input_norm.gamma"
    shards = [record.tensors[f"tp{t}/pp0/chunk0/module.language_model.encoder.layers.0.input_norm.weight::param"]
              for t in range(2)]
    want = ((shards[0].double() + shards[1].double()) / 2).float().numpy()
    assert got[name].tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------
# Without re-sharding nothing changes; the dry run; refusals


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "manifest" not in p.name and "lock" not in p.name}


def test_ms_flags_equal_to_the_source_change_no_byte(sources, tmp_path):
    fx = sources["legacy-tp2pp2"]
    assert convert(fx, tmp_path / "plain").returncode == 0
    same = convert(fx, tmp_path / "same", "--ms-tp-size", "2", "--ms-pp-size", "2", "--ms-stage-list", "2", "2")
    assert same.returncode == 0 and "without re-sharding" in same.stdout
    plain, flagged = _files(tmp_path / "plain"), _files(tmp_path / "same")
    assert plain.keys() == flagged.keys() and all(plain[k] == flagged[k] for k in plain)


def test_dry_run_prints_every_target_rank_with_its_segments(sources, tmp_path, capsys):
    out = tmp_path / "ms"
    proc = convert(sources["legacy-tp2pp2"], out, "--ms-tp-size", "1", "--ms-pp-size", "4", "--dry-run")
    assert proc.returncode == 0
    text = proc.stdout
    assert text.count("plan for target") == 4
    assert "exp_avg_sq.language_model.encoder.layers.3.attention.out_proj.weight [16, 16]" in text
    assert "gather row from 2 segments" in text and "[0:16, 0:8] -> [0:16, 8:16]" in text
    assert not out.exists()


REFUSALS = [
    (["--ms-tp-size", "3"], "--ms-tp-size 3: 4 attention heads do not split over it"),
    (["--ms-tp-size", "8"], "--ms-tp-size 8: 4 attention heads"),
    (["--ms-pp-size", "5"], "--ms-pp-size 5 --ms-vpp-size 1: 4 layers do not fit"),
    (["--ms-pp-size", "2", "--ms-stage-list", "1", "2"], "--ms-stage-list 1 2"),
    (["--ms-pp-size", "2", "--ms-stage-list", "4", "0"], "--ms-stage-list 4 0"),
    (["--ms-ep-size", "2"], "--ms-ep-size 2 for a model without experts"),
    (["--ms-pp-size", "0"], "--ms-pp-size 0"),
    (["--ms-stage-list", "1", "1"], "--ms-stage-list 1 1"),
    (["--ms-tp-size", "1", "--convert-param-only"], "--convert-param-only with a re-shard"),
    (["--ms-tp-size", "1", "--name-style", "documented"], "--name-style documented with a re-shard"),
]


@pytest.mark.parametrize("flags,message", REFUSALS, ids=[" ".join(f) for f, _ in REFUSALS])
def test_refusals_are_one_line_exit_2_nothing_written(flags, message, sources, tmp_path):
    out = tmp_path / "ms"
    proc = convert(sources["legacy-tp2pp2"], out, *flags)
    assert proc.returncode == 2, proc.stdout[-2000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and "lock" not in p.name]


def test_shards_check_and_resume_work_per_target_rank(sources, tmp_path):
    fx = sources["legacy-tp2pp2"]
    out = tmp_path / "ms"
    flags = ("--ms-tp-size", "1", "--ms-pp-size", "4", "--replica-policy", "first")
    assert convert(fx, out, *flags, "--check").returncode != 0  # nothing converted yet
    first = convert(fx, out, *flags, "--shard", "0/2")
    second = convert(fx, out, *flags, "--shard", "1/2")
    assert first.returncode == second.returncode == 0
    assert first.stdout.count("successfully") + second.stdout.count("successfully") == 4
    assert convert(fx, out, *flags, "--check").returncode == 0
    again = convert(fx, out, *flags)
    assert again.returncode == 0 and "0 converted, 4 skipped" in again.stdout
    whole = tmp_path / "whole"
    assert convert(fx, whole, *flags).returncode == 0
    assert _files(out).keys() == _files(whole).keys()
    for name in (f"rank_{r}/network.ckpt" for r in range(4)):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
