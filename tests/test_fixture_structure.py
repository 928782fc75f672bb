"""The fixture generator against the checkpoint Megatron-LM itself wrote, and against itself.

1. With the megatron_sample's configuration, the generator must reproduce the sample file by file:
   tree, model/optimizer/scheduler/rng/args structure, distrib_optim.pt layout and values
   (padding aside), param_map JSON bytes, expected.json / expected.pt.
2. For other layouts, the record (expected.json / expected.pt) must agree with the files, read
   through a tiny reader written here (not the generator's code).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.megatron_fixture import FixtureSpec, load_megatron_file, write_fixture

SAMPLE = Path(__file__).parent / "data" / "megatron_sample"
SAMPLE_SPEC = FixtureSpec(tp=2, pp=2, dp=2, num_layers=4, hidden=40, heads=4, ffn=130, vocab=97,
                          make_vocab_size_divisible_by=1, overlap_grad_reduce=True, bucket_size=700,
                          untie_embeddings=False, iteration=10, dtype="bf16", model="legacy")

# args fields compared by value with the sample (the fields the checkpoint format names, plus the
# layout fields the converter needs); all other fields are compared by name and order only.
ARGS_COMPARED = (
    "num_layers", "encoder_num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "kv_channels", "max_position_embeddings", "seq_length", "vocab_size", "padded_vocab_size",
    "make_vocab_size_divisible_by", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "transformer_pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "data_parallel_size", "context_parallel_size",
    "bf16", "fp16", "params_dtype", "accumulate_allreduce_grads_in_fp32", "use_distributed_optimizer",
    "overlap_grad_reduce", "untie_embeddings_and_output_weights", "use_mcore_models",
    "global_batch_size", "micro_batch_size", "iteration", "rank", "world_size", "model_type",
    "position_embedding_type", "normalization", "add_bias_linear", "transformer_impl",
)


# --------------------------------------------------------------------------------------------
# A tiny independent reader


def _load(path: Path):
    return load_megatron_file(path)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md")


def _model_dicts(sd: dict) -> dict[int, dict]:
    if "model" in sd:
        return {0: sd["model"]}
    return {int(k[5:]): v for k, v in sd.items() if k.startswith("model") and k[5:].isdigit()}


def _rank_folders(megatron_path: Path) -> dict[tuple[int, int], Path]:
    out = {}
    for d in sorted(megatron_path.iterdir()):
        parts = d.name.split("_")  # mp_rank_TT or mp_rank_TT_PPP
        out[(int(parts[2]), int(parts[3]) if len(parts) > 3 else 0)] = d
    return out


def _describe(v):
    if torch.is_tensor(v):
        return ("tensor", tuple(v.shape), v.dtype)
    if isinstance(v, dict):
        return ("dict", tuple((k, _describe(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, len(v), tuple(_describe(x) for x in v[:3]))
    if isinstance(v, np.ndarray):
        return ("ndarray", v.shape, str(v.dtype))
    return (type(v).__name__,)


# --------------------------------------------------------------------------------------------
# 1. Same as the checkpoint Megatron wrote


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("sample_like"), SAMPLE_SPEC)


def test_tree_matches_sample(generated):
    assert _files(generated.root) == _files(SAMPLE)
    assert generated.megatron_path.name == "iter_0000010"
    assert (generated.root / "latest_checkpointed_iteration.txt").read_bytes() == \
        (SAMPLE / "latest_checkpointed_iteration.txt").read_bytes()


RANKS = ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]


@pytest.mark.parametrize("rank", RANKS)
def test_model_optim_rng_matches_sample(generated, rank):
    ref = _load(SAMPLE / "iter_0000010" / rank / "model_optim_rng.pt")
    got = _load(generated.megatron_path / rank / "model_optim_rng.pt")
    assert list(got) == list(ref)
    for k in ("checkpoint_version", "iteration", "num_floating_point_operations_so_far"):
        assert got[k] == ref[k] and type(got[k]) is type(ref[k])

    # model: same nested key paths in order, same shapes/dtypes, same non-tensor entries, and the
    # same storage layout (views into one param buffer per DDP buffer) and values
    fr, fg = _flatten(ref["model"]), _flatten(got["model"])
    assert [k for k, _ in fg] == [k for k, _ in fr]
    assert [tuple(ref["model"])] == [tuple(got["model"])]
    for (k, r), (_, g) in zip(fr, fg):
        if not torch.is_tensor(r):
            assert g == r, k
            continue
        assert (g.shape, g.dtype) == (r.shape, r.dtype), k
        assert g.storage_offset() == r.storage_offset(), k
        assert g.untyped_storage().nbytes() == r.untyped_storage().nbytes(), k
        assert torch.equal(g, r), k

    # optimizer / scheduler
    assert list(got["optimizer"]) == list(ref["optimizer"]) == ["optimizer"]
    assert list(got["optimizer"]["optimizer"]) == list(ref["optimizer"]["optimizer"])
    gr, gg = ref["optimizer"]["optimizer"]["param_groups"], got["optimizer"]["optimizer"]["param_groups"]
    assert len(gg) == len(gr) == 2
    for r, g in zip(gr, gg):
        assert list(g) == list(r)
        for k in ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "max_lr", "min_lr",
                  "bias_correction", "betas", "eps", "weight_decay"):
            assert g[k] == r[k], k
        assert [type(g[k]) for k in g] == [type(r[k]) for k in r]
    assert list(got["opt_param_scheduler"]) == list(ref["opt_param_scheduler"])
    assert [type(v) for v in got["opt_param_scheduler"].values()] == \
        [type(v) for v in ref["opt_param_scheduler"].values()]

    # rng_state: same structure (list of one dict, numpy state tuple, 5056-byte torch states)
    assert _describe(got["rng_state"]) == _describe(ref["rng_state"])
    np_ref, np_got = ref["rng_state"][0]["np_rng_state"], got["rng_state"][0]["np_rng_state"]
    assert np_got[0] == np_ref[0] and np_got[1].dtype == np_ref[1].dtype and np_got[1].shape == np_ref[1].shape
    # the seeds Megatron derives: 1234 + 100 * pp (+2718 + tp for the model-parallel tracker)
    assert int(np_got[1][0]) == int(np_ref[1][0])
    for name, t in ref["rng_state"][0]["rng_tracker_states"].items():
        assert torch.equal(got["rng_state"][0]["rng_tracker_states"][name][:8], t[:8]), name

    # args: every field of the sample, in its order; layout fields equal
    ar, ag = vars(ref["args"]), vars(got["args"])
    assert list(ag) == list(ar)
    for k in ARGS_COMPARED:
        assert ag[k] == ar[k], k
    assert type(ag["model_type"]).__module__ == "megatron.core.enums"
    assert ag["model_type"].name == "encoder_or_decoder"


@pytest.mark.parametrize("rank", RANKS)
def test_distrib_optim_matches_sample(generated, rank):
    ref = _load(SAMPLE / "iter_0000010" / rank / "distrib_optim.pt")
    got = _load(generated.megatron_path / rank / "distrib_optim.pt")
    assert list(got) == list(ref)
    assert got["per_bucket_numel"] == ref["per_bucket_numel"]
    assert got["per_bucket_numel_unpadded"] == ref["per_bucket_numel_unpadded"]
    for gbuf in (k for k in ref if isinstance(k, int)):
        assert list(got[gbuf]) == list(ref[gbuf])
        for key, states in ref[gbuf].items():
            assert list(got[gbuf][key]) == list(states) == ["param", "exp_avg", "exp_avg_sq"]
            unpadded = ref["per_bucket_numel_unpadded"][gbuf][key]
            for s, tensors in states.items():
                mine = got[gbuf][key][s]
                assert type(mine) is type(tensors) is list and len(mine) == len(tensors)
                for i, (r, g) in enumerate(zip(tensors, mine)):
                    assert (g.shape, g.dtype) == (r.shape, r.dtype)
                    assert g.untyped_storage().nbytes() == g.numel() * 4  # one storage per bucket
                    assert torch.equal(g[:unpadded[i]], r[:unpadded[i]]), (s, i)
                    assert torch.isnan(g[unpadded[i]:]).all(), "padding must hold the sentinel"


def test_param_maps_match_sample(generated):
    ref_files = sorted(p.name for p in (SAMPLE / "param_map").iterdir())
    assert sorted(p.name for p in generated.param_map_dir.iterdir()) == ref_files
    for name in ref_files:
        ref_bytes = (SAMPLE / "param_map" / name).read_bytes()
        got_bytes = (generated.param_map_dir / name).read_bytes()
        ref, got = json.loads(ref_bytes), json.loads(got_bytes)
        assert got == ref and list(got) == list(ref), name
        assert got_bytes == ref_bytes, name


def test_expected_record_matches_sample(generated):
    ref = json.loads((SAMPLE / "expected.json").read_text())
    got = json.loads((generated.root / "expected.json").read_text())
    assert list(got) == list(ref) == ["meta", "params"]
    assert list(got["meta"])[:len(ref["meta"])] == list(ref["meta"])
    assert {k: got["meta"][k] for k in ref["meta"]} == ref["meta"]
    for k in ("cp", "dtype", "stage_list", "release", "model"):
        assert k in got["meta"]
    assert [p["key"] for p in got["params"]] == [p["key"] for p in ref["params"]]
    for r, g in zip(ref["params"], got["params"]):
        assert list(g)[:len(r)] == list(r)
        for k, v in r.items():  # names, shapes, layers and, the values being the same, the digests
            assert g[k] == v, (r["key"], k)
        for k in ("state_dict_key", "requires_grad", "buffer", "gbuf_idx", "param_dtype"):
            assert k in g
        assert g["requires_grad"] is True and g["buffer"] == 0 and g["gbuf_idx"] == 0
        assert g["param_dtype"] == "torch.bfloat16"
    ref_t = torch.load(SAMPLE / "expected.pt", weights_only=True)
    got_t = torch.load(generated.root / "expected.pt", weights_only=True)
    assert list(got_t) == list(ref_t)
    for k, r in ref_t.items():
        assert got_t[k].dtype == r.dtype and torch.equal(got_t[k], r), k


# --------------------------------------------------------------------------------------------
# 2. The record agrees with the files, for other layouts

LAYOUTS = {
    "pp4_vpp2_dp2_buckets": FixtureSpec(pp=4, vpp=2, dp=2, num_layers=8, overlap_grad_reduce=True,
                                        bucket_size=1000),
    "mcore_tp2_pp2_dp2": FixtureSpec(model="mcore", tp=2, pp=2, dp=2, overlap_grad_reduce=True,
                                     bucket_size=600),
    "mcore_untied_pp1": FixtureSpec(model="mcore", dp=2, untie_embeddings=True),
    "fp16_pp2": FixtureSpec(dtype="fp16", pp=2, dp=2),
    "fp32_tp2_untied": FixtureSpec(dtype="fp32", tp=2, dp=2, untie_embeddings=True),
    "mixed_pp4_vpp2": FixtureSpec(mixed_dtype=True, pp=4, vpp=2, num_layers=8, dp=2,
                                  overlap_grad_reduce=True, bucket_size=1000),
    "mcore_cp2_dp2": FixtureSpec(model="mcore", cp=2, dp=2, pp=2, overlap_grad_reduce=True, bucket_size=1000),
    "uneven_stage_list": FixtureSpec(pp=2, num_layers=4, stage_list=(3, 1), dp=2),
    "frozen": FixtureSpec(pp=2, dp=2, frozen=("position_embeddings", "layers.0.input_norm")),
    "release_sidecar_untied": FixtureSpec(pp=2, dp=3, release=True, untie_embeddings=True,
                                          param_map="with_sidecar", overlap_grad_reduce=True, bucket_size=500),
}


def _check_layout(root: Path, spec: FixtureSpec):
    rec = json.loads((root / "expected.json").read_text())
    expected = torch.load(root / "expected.pt", weights_only=True)
    meta = rec["meta"]
    dpw = spec.dp * spec.cp
    megatron_path = root / ("release" if spec.release else f"iter_{spec.iteration:07d}")
    tracker = (root / "latest_checkpointed_iteration.txt").read_text()
    assert tracker == ("release" if spec.release else str(spec.iteration))
    for k in ("cp", "dtype", "stage_list", "release", "model"):
        assert k in meta
    folders = _rank_folders(megatron_path)
    assert sorted(folders) == [(t, p) for t in range(spec.tp) for p in range(spec.pp)]
    for (t, p), folder in folders.items():
        assert folder.name == (f"mp_rank_{t:02d}" if spec.pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
        assert sorted(x.name for x in folder.iterdir()) == ["distrib_optim.pt", "model_optim_rng.pt"]

    by_rank: dict[tuple[int, int], list[dict]] = {}
    for e in rec["params"]:
        by_rank.setdefault((e["tp"], e["pp"]), []).append(e)

    for (t, p), folder in folders.items():
        optim = _load(folder / "distrib_optim.pt")
        sd = _load(folder / "model_optim_rng.pt")
        models = _model_dicts(sd)
        assert sorted(models) == list(range(spec.vpp))
        flat = {c: dict(_flatten(m)) for c, m in models.items()}
        n_gbuf = len(optim["per_bucket_numel"])
        assert list(optim) == ["per_bucket_numel", "per_bucket_numel_unpadded", *range(n_gbuf)]

        # buffers of every chunk chained into gbuf_idx; per chunk, one per (param, grad) dtype
        gbuf = 0
        covered = {}
        for c in range(spec.vpp):
            maps = sorted((root / "param_map").glob(f"param_map_buffer*_dp0tp{t}pp{p}vpp{c}.json"))
            n_buf = len(maps)
            assert n_buf >= 1
            for b in range(n_buf):
                name = f"param_map_buffer{b}_dp0tp{t}pp{p}vpp{c}.json"
                text = (root / "param_map" / name).read_text()
                for d in range(dpw):  # every DP (x CP) rank writes the same map
                    assert (root / "param_map" / name.replace("_dp0", f"_dp{d}")).read_text() == text
                assert not (root / "param_map" / name.replace("_dp0", f"_dp{dpw}")).exists()
                pmap = json.loads(text)
                (key, numels), = optim["per_bucket_numel"][gbuf].items()
                (key2, unpadded), = optim["per_bucket_numel_unpadded"][gbuf].items()
                assert key == key2 and list(optim[gbuf]) == [key]
                grad_dtype = torch.float32 if spec.dtype == "bf16" else key[0]
                assert key[1] == grad_dtype
                starts = [sum(numels[:i]) for i in range(len(numels))]
                for n, u in zip(numels, unpadded):
                    assert n % dpw == 0 and 0 <= n - u < dpw
                if c > 0 or p > 0 or not spec.overlap_grad_reduce:  # bucketing off; shared embedding apart
                    shared = sum(1 for v in pmap.values() if v[4] != 0)
                    assert len(numels) <= 2 and (len(numels) == 1 or shared)
                # params packed back to back from each bucket start, in map order
                pos = {i: starts[i] for i in range(len(numels))}
                for pname, (dtype, shape, s, e, bucket) in pmap.items():
                    assert dtype == str(key[0])
                    assert s == pos[bucket] and e - s == math.prod(shape)
                    pos[bucket] = e
                for i in range(len(numels)):
                    assert pos[i] == starts[i] + unpadded[i]
                states = optim[gbuf][key]
                assert list(states) == ["param", "exp_avg", "exp_avg_sq"]
                for s_name, tensors in states.items():
                    assert [x.numel() for x in tensors] == numels
                    for i, x in enumerate(tensors):
                        assert x.dtype == torch.float32
                        assert torch.isnan(x[unpadded[i]:]).all()  # padding: sentinel
                        assert not torch.isnan(x[:unpadded[i]]).any()
                covered[(c, b)] = (gbuf, key, starts, pmap, states)
                gbuf += 1
        assert gbuf == n_gbuf

        for e in by_rank[(t, p)]:
            c = e["vpp_chunk"]
            model_t = flat[c][e["state_dict_key"]]
            assert torch.is_tensor(model_t)
            assert list(model_t.shape) == e["shape"] and str(model_t.dtype) == e["param_dtype"]
            assert torch.equal(model_t, expected[f"{e['key']}::model_bf16"])
            if not e["requires_grad"]:
                assert e["buffer"] is None and e["param"] is None
                assert not any(e["name"] in cov[3] for cov in covered.values())
                continue
            gb, key, starts, pmap, states = covered[(c, e["buffer"])]
            assert gb == e["gbuf_idx"]
            dtype, shape, s, end, bucket = pmap[e["name"]]
            assert shape == e["shape"] and dtype == e["param_dtype"]
            assert (bucket, s, end) == (e["bucket"], e["buffer_start"], e["buffer_end"])
            for s_name in ("param", "exp_avg", "exp_avg_sq"):
                got = states[s_name][bucket][s - starts[bucket]:end - starts[bucket]].view(shape)
                assert torch.equal(got, expected[f"{e['key']}::{s_name}"]), (e["key"], s_name)
            v = expected[f"{e['key']}::param"].reshape(-1)
            assert torch.equal(expected[f"{e['key']}::exp_avg"].reshape(-1), -v)
            if meta["values_exact_fp32"]:
                assert torch.equal(v, torch.arange(v[0].item(), v[0].item() + v.numel()))
                assert torch.equal(expected[f"{e['key']}::exp_avg_sq"].reshape(-1), v + 0.5)
        # every parameter of every map is in the record
        names = {(e["vpp_chunk"], e["name"]) for e in by_rank[(t, p)]}
        for (c, b), cov in covered.items():
            assert all((c, n) in names for n in cov[3])
        yield (t, p), sd, optim, flat


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_record_matches_files(tmp_path, layout):
    spec = LAYOUTS[layout]
    fx = write_fixture(tmp_path, spec)
    assert fx.megatron_path == tmp_path / ("release" if spec.release else "iter_0000010")
    ranks = {rp: (sd, optim, flat) for rp, sd, optim, flat in _check_layout(tmp_path, spec)}
    rec = json.loads((tmp_path / "expected.json").read_text())
    names = [e["name"] for e in rec["params"]]
    prefix = "" if spec.dtype == "fp32" else "module."
    assert all(n.startswith(prefix) for n in names)
    if spec.dtype == "fp32":
        assert not any(n.startswith("module.") for n in names)

    if layout == "pp4_vpp2_dp2_buckets":
        sd, optim, _ = ranks[(0, 0)]
        assert [k for k in sd if k.startswith("model")] == ["model0", "model1"]
        key = (torch.bfloat16, torch.float32)
        assert len(optim["per_bucket_numel"][0][key]) > 2  # several buckets in chunk 0 of stage 0
        assert len(optim["per_bucket_numel"][1][key]) == 1  # chunk 1: bucketing off
        assert vars(sd["args"])["virtual_pipeline_model_parallel_size"] == 2
        # embeddings in chunk 0 of stage 0, head copy in the last chunk of the last stage
        emb = [e for e in rec["params"] if "word_embeddings" in e["name"]]
        assert sorted((e["pp"], e["vpp_chunk"], e["name"]) for e in emb) == [
            (0, 0, "module.language_model.embedding.word_embeddings.weight"),
            (3, 1, "module.word_embeddings.weight")]
        layers = sorted({(e["pp"], e["vpp_chunk"], e["global_layer"]) for e in rec["params"]
                         if e["global_layer"] is not None})
        assert layers == sorted((p, c, c * 4 + p) for p in range(4) for c in range(2))
    if layout == "mcore_tp2_pp2_dp2":
        sd, optim, flat = ranks[(1, 1)]
        assert "output_layer._extra_state" in flat[0] and flat[0]["output_layer._extra_state"] is None
        assert flat[0]["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
        assert "output_layer.weight" in flat[0]  # tied head copy on the last stage
        keys = list(sd["model"])
        assert keys.index("decoder.layers.0.self_attention.linear_proj.weight") < \
            keys.index("decoder.layers.0.self_attention.linear_qkv.weight")
        pmap = json.loads((tmp_path / "param_map" / "param_map_buffer0_dp0tp1pp1vpp0.json").read_text())
        assert list(pmap)[0] == "module.output_layer.weight" and pmap["module.output_layer.weight"][4] == 0
        assert len({v[4] for v in pmap.values()}) == 2  # the shared head weight in a bucket of its own
        _, _, flat0 = ranks[(0, 0)]
        assert "output_layer._extra_state" not in flat0[0]
    if layout == "mcore_untied_pp1":
        _, _, flat = ranks[(0, 0)]
        assert "output_layer.weight" in flat[0] and "embedding.word_embeddings.weight" in flat[0]
    if layout == "fp16_pp2":
        sd, optim, _ = ranks[(0, 0)]
        assert set(sd["optimizer"]) == {"optimizer", "grad_scaler"}
        assert set(sd["optimizer"]["grad_scaler"]) == {"scale", "growth_tracker", "hysteresis_tracker"}
        assert list(optim["per_bucket_numel"][0]) == [(torch.float16, torch.float16)]
    if layout == "fp32_tp2_untied":
        sd, optim, flat = ranks[(1, 0)]
        assert "grad_scaler" not in sd["optimizer"]
        assert list(optim["per_bucket_numel"][0]) == [(torch.float32, torch.float32)]
        assert "language_model.output_layer.weight" in flat[0]
        assert flat[0]["language_model.output_layer._extra_state"] is None
    if layout == "mixed_pp4_vpp2":
        for (t, p), (sd, optim, _) in ranks.items():
            keys = [next(iter(x)) for x in optim["per_bucket_numel"]]
            assert len(keys) == 4  # two buffers per chunk, chained over both chunks
            assert set(keys) == {(torch.bfloat16, torch.float32), (torch.float32, torch.float32)}
            first = (torch.bfloat16, torch.float32) if p == 0 else (torch.float32, torch.float32)
            assert keys[0] == first  # buffer order: first appearance in named_parameters()
        assert {e["param_dtype"] for e in rec["params"] if "norm" in e["name"]} == {"torch.float32"}
    if layout == "mcore_cp2_dp2":
        sd, optim, _ = ranks[(0, 0)]
        assert vars(sd["args"])["context_parallel_size"] == 2
        for x in optim["per_bucket_numel"]:
            assert all(n % 4 == 0 for n in next(iter(x.values())))
        assert len(list((tmp_path / "param_map").glob("*tp0pp0vpp0.json"))) == 4
    if layout == "uneven_stage_list":
        offsets = {e["pp"]: e["local_layer_offset"] for e in rec["params"]}
        assert offsets == {0: 0, 1: 3}
        assert rec["meta"]["stage_list"] == [3, 1]
        assert max(e["global_layer"] for e in rec["params"] if e["global_layer"] is not None) == 3
    if layout == "frozen":
        frozen = [e for e in rec["params"] if not e["requires_grad"]]
        norm = "module.language_model.encoder.layers.0.input_norm."
        assert sorted((e["pp"], e["name"]) for e in frozen) == [  # local names: layer 0 of each stage
            (0, "module.language_model.embedding.position_embeddings.weight"),
            (0, norm + "bias"), (0, norm + "weight"), (1, norm + "bias"), (1, norm + "weight")]
        assert all(e[s] is None for e in frozen for s in ("param", "exp_avg", "exp_avg_sq"))
        assert all(e["model_bf16"] is not None for e in frozen)
    if layout == "release_sidecar_untied":
        sd, _, flat = ranks[(0, 1)]
        assert "language_model.output_layer.weight" in flat[0]
        assert "word_embeddings_for_head.weight" not in flat[0]
        for meta_file in sorted((tmp_path / "param_map").glob("*.meta.json")):
            m = json.loads(meta_file.read_text())
            assert m["format"] == "convert_pt2ckpt.param_map_meta" and m["version"] == 1
            assert m["data_parallel_size"] == 3 and m["param_dtype"] == "torch.bfloat16"
            assert m["bucket_size"] == (500 if m["pp_rank"] == 0 else None)
            pmap = json.loads(meta_file.with_name(meta_file.name.replace(".meta.json", ".json")).read_text())
            assert m["numel"] == m["buckets"][-1]["end"]
            for i, b in enumerate(m["buckets"]):
                inside = [v for v in pmap.values() if v[4] == i]
                assert b["start"] == min(v[2] for v in inside)
                assert b["numel_unpadded"] == max(v[3] for v in inside) - b["start"]
                assert b["end"] % 3 == 0


def test_param_map_none_writes_no_maps(tmp_path):
    fx = write_fixture(tmp_path, FixtureSpec(pp=2, param_map="none"))
    assert not fx.param_map_dir.exists()
    rec = json.loads((tmp_path / "expected.json").read_text())
    assert all(e["buffer_start"] is not None for e in rec["params"])


@pytest.mark.parametrize("kwargs", [
    dict(pp=2, vpp=2, num_layers=4),  # core_r0.6.0: interleaving needs pp > 2
    dict(cp=2),  # legacy model: context parallelism only with mcore
    dict(pp=2, num_layers=4, stage_list=(1, 2)),
    dict(pp=3, vpp=2, num_layers=6, stage_list=(2, 2, 2)),
    dict(heads=3),
    dict(dtype="fp32", mixed_dtype=True),
])
def test_spec_rejects_what_megatron_rejects(kwargs):
    with pytest.raises(ValueError):
        FixtureSpec(**kwargs)


def test_unbuildable_shared_embedding_bucket_is_refused(tmp_path):
    # ParamAndGradBuffer asserts that the params before a shared embedding end on a multiple of
    # the DP size: on stage 0, position embeddings (7 * 16) + one layer (2488) = 2600, not a
    # multiple of 3.
    with pytest.raises(ValueError, match="cannot build"):
        write_fixture(tmp_path, FixtureSpec(pp=2, dp=3, seq_length=7))
    write_fixture(tmp_path / "ok", FixtureSpec(pp=2, dp=3, seq_length=8))  # 2616 = 3 * 872


def test_bucketing_by_hand(tmp_path):
    """ParamAndGradBuffer rules worked out by hand for legacy, 2 layers, hidden 16, ffn 40, vocab 50.

    Reverse named_parameters(): final_norm.bias 16, final_norm.weight 16, then per layer (1, 0)
    dense_4h_to_h.bias 16, .weight 640, dense_h_to_4h.bias 40, .weight 640, post_attention_norm
    16 + 16, dense.bias 16, .weight 256, query_key_value.bias 48, .weight 768, input_norm 16 + 16,
    then position_embeddings 128, word_embeddings 800. A bucket closes once it holds >= 700
    elements; its end is padded to a multiple of dp (3), and the next bucket starts there.
    """
    fx = write_fixture(tmp_path / "a", FixtureSpec(dp=3, overlap_grad_reduce=True, bucket_size=700))
    optim = _load(fx.megatron_path / "mp_rank_00" / "distrib_optim.pt")
    key = (torch.bfloat16, torch.float32)
    assert optim["per_bucket_numel_unpadded"] == [{key: [728, 944, 816, 728, 944, 816, 960]}]
    assert optim["per_bucket_numel"] == [{key: [729, 945, 816, 729, 945, 816, 960]}]
    pmap = json.loads((fx.param_map_dir / "param_map_buffer0_dp2tp0pp0vpp0.json").read_text())
    assert pmap["module.language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"] == \
        ["torch.bfloat16", [40, 16], 729, 1369, 1]
    # exactly bucket_size elements close the bucket (>=, not >)
    fx = write_fixture(tmp_path / "b", FixtureSpec(overlap_grad_reduce=True, bucket_size=32))
    optim = _load(fx.megatron_path / "mp_rank_00" / "distrib_optim.pt")
    assert optim["per_bucket_numel"][0][key][0] == 32
    # overlap_grad_reduce off: one bucket whatever bucket_size says
    fx = write_fixture(tmp_path / "c", FixtureSpec(dp=3, bucket_size=32))
    optim = _load(fx.megatron_path / "mp_rank_00" / "distrib_optim.pt")
    assert optim["per_bucket_numel"] == [{key: [5937]}]
    assert optim["per_bucket_numel_unpadded"] == [{key: [5936]}]


def test_mcore_parameters_match_legacy(tmp_path):
    """mcore (local spec) holds the same tensors as legacy, under other names and in another order.

    The legacy layout is checked against the Megatron-written sample above; the renames follow
    megatron/core/models/gpt/gpt_layer_specs.py (get_gpt_layer_local_spec).
    """
    renames = [("language_model.embedding.", "embedding."), ("language_model.encoder.", "decoder."),
               ("input_norm", "input_layernorm"), ("post_attention_norm", "pre_mlp_layernorm"),
               ("self_attention.query_key_value", "self_attention.linear_qkv"),
               ("self_attention.dense", "self_attention.linear_proj"),
               ("mlp.dense_h_to_4h", "mlp.linear_fc1"), ("mlp.dense_4h_to_h", "mlp.linear_fc2"),
               ("final_norm", "final_layernorm"), ("module.word_embeddings.", "module.output_layer."),
               ("language_model.output_layer.", "output_layer.")]

    def shapes(spec, where):
        write_fixture(where, spec)
        rec = json.loads((where / "expected.json").read_text())
        out = {}
        for e in rec["params"]:
            name = e["name"]
            if spec.model == "legacy":
                for a, b in renames:
                    name = name.replace(a, b)
            out[(e["tp"], e["pp"], name)] = (e["shape"], e["global_layer"], e["requires_grad"])
        return out

    for untie in (False, True):
        kw = dict(tp=2, pp=2, dp=2, num_layers=4, untie_embeddings=untie)
        legacy = shapes(FixtureSpec(model="legacy", **kw), tmp_path / f"legacy{untie}")
        mcore = shapes(FixtureSpec(model="mcore", **kw), tmp_path / f"mcore{untie}")
        assert mcore == legacy
