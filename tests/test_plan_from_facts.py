"""Both directions plan from recorded facts alone: the facts are plain data built here (what reading
a Megatron folder, a pt_meta record and a MindSpore header would give), no file exists anywhere, and
the plans are compared with what Megatron core_r0.6.0's own rules say (a grad buffer holds the
parameters in reverse order, one bucket padded to a multiple of dp x cp; docs/names.md for names)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_ms_convert import ckpt2pt, pt2ckpt
from megatron_ms_convert.ckpt2pt_facts import BackFacts, MsFileFacts
from megatron_ms_convert.ckpt2pt_plan import plan_conversion
from megatron_ms_convert.megatron.layout import BucketCounts, BufferLayout, ParamSpan
from megatron_ms_convert.megatron.writer import TensorSpec
from megatron_ms_convert.mindspore.reader import StoredTensor
from megatron_ms_convert.plan import BucketSlice, RankInfo, RankMeta, Scalar
from megatron_ms_convert.topology import RankFolder, Topology

NOWHERE = Path("/nonexistent/shape-test")
BF16 = ("torch.bfloat16", "torch.float32")
STATES = ("param", "exp_avg", "exp_avg_sq")
# a one-layer legacy GPT: (saved key, shape) in named_parameters() order, and its MindSpore name
# (docs/names.md: LayerNorm weight/bias are gamma/beta in the mindspeed style)
PARAMS = [("language_model.embedding.word_embeddings.weight", (8, 4),
           "language_model.embedding.word_embeddings.weight"),
          ("language_model.encoder.layers.0.input_norm.weight", (4,),
           "language_model.encoder.layers.0.input_norm.gamma"),
          ("language_model.encoder.layers.0.input_norm.bias", (4,),
           "language_model.encoder.layers.0.input_norm.beta"),
          ("language_model.encoder.final_norm.weight", (4,), "language_model.encoder.final_norm.gamma")]


def megatron_buffer() -> dict[str, tuple[int, int]]:
    """Megatron r0.6.0 lays a buffer's parameters out in reverse order, one after the other."""
    spans, at = {}, 0
    for key, shape, _ in reversed(PARAMS):
        numel = int(torch.Size(shape).numel())
        spans[key] = (at, at + numel)
        at += numel
    return spans


def run_args(**extra) -> argparse.Namespace:
    # bf16 runs reduce grads in fp32 (Megatron sets accumulate_allreduce_grads_in_fp32 with --bf16)
    return argparse.Namespace(num_layers=1, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              use_mcore_models=False, bf16=True, accumulate_allreduce_grads_in_fp32=True,
                              seq_length=16, global_batch_size=6,
                              consumed_train_samples=60, **extra)


def test_forward_plan_from_facts():
    total = sum(end - start for start, end in megatron_buffer().values())
    info = RankInfo(folder=RankFolder(pp=0, tp=0, path=NOWHERE / "iter_0000010" / "mp_rank_00"), iteration=10,
                    args=run_args(), chunk_keys=("model",),
                    chunk_tensors=(tuple((key, shape, "torch.bfloat16") for key, shape, _ in PARAMS),),
                    param_groups=({"lr": 0.5, "step": 10, "params": [0, 1, 2, 3]},), scheduler={"num_steps": 60},
                    counts=(BucketCounts(0, BF16, (total,), (total,)),), states=STATES)
    facts = pt2ckpt.SourceFacts(iteration_dir=NOWHERE / "iter_0000010", args=info.args,
                                experts=pt2ckpt.ExpertParallel(), infos=(info,), mapped=((None,),))
    options = pt2ckpt.options_from_args(pt2ckpt.build_parser().parse_args(
        ["--megatron-path", str(NOWHERE), "--ms-path", str(NOWHERE / "ms")]))
    [plan] = pt2ckpt.plan_conversion(facts, options).plans

    assert plan.outputs == (NOWHERE / "ms" / "rank_0" / "network.ckpt",)
    got = {t.name: t for t in plan.tensors}
    want_names = set()
    for key, shape, ms_name in PARAMS:
        start, end = megatron_buffer()[key]
        for state in STATES:
            name = ms_name if state == "param" else f"{state}.{ms_name}"
            want_names.add(name)
            assert (got[name].shape, got[name].dtype) == (shape, "float32")
            assert got[name].source == BucketSlice(0, BF16, state, 0, start, end)
    assert got["step_num"].source == Scalar(10) and got["learning_rate_group_0"].source == Scalar(0.5)
    assert got["num_steps"].source == Scalar(60) and got["state_step"].source == Scalar(10.0)
    assert set(got) == want_names | {"step_num", "epoch_num", "learning_rate_group_0", "state_step", "num_steps"}
    assert "exp_avg.language_model.encoder.final_norm.gamma [4] float32 <- distrib_optim[0]" in plan.describe()


def skeleton() -> dict:
    tree: dict = {}
    for key, shape, _ in PARAMS:
        *path, leaf = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = TensorSpec(shape, torch.bfloat16)
    return {"language_model": tree["language_model"]}


def test_back_plan_from_facts():
    spans = megatron_buffer()
    total = sum(end - start for start, end in spans.values())
    layout = BufferLayout(0, 0, tuple(ParamSpan("module." + key, "torch.bfloat16", shape, *spans[key], 0)
                                      for key, shape, _ in reversed(PARAMS)), "recorded")
    meta = {"args": run_args(data_parallel_size=1, context_parallel_size=1, world_size=1), "iteration": 10,
            "optimizer": {"optimizer": {"param_groups": [{"lr": 0.5, "step": 10, "params": [0, 1, 2, 3]}]}},
            "opt_param_scheduler": {"num_steps": 60, "lr_decay_style": "cosine"}}
    rank = RankMeta(NOWHERE / "pt_meta" / "args_tp00_pp000.pt", meta, [skeleton()], [layout],
                    [BucketCounts(0, BF16, (total,), (total,))])
    header = tuple(StoredTensor(ms_name if state == "param" else f"{state}.{ms_name}", shape, "float32")
                   for _, shape, ms_name in PARAMS for state in STATES)
    scalars = (("step_num", 12), ("epoch_num", 0), ("learning_rate_group_0", 0.25), ("lr_decay_style", 2))
    ms = MsFileFacts(NOWHERE / "ms" / "rank_0" / "network.ckpt",
                     header + tuple(StoredTensor(name, (), "float32") for name, _ in scalars), scalars)
    topology = Topology(tp_size=1, pp_size=1, dp_size=1, cp_size=1, vpp_size=1, num_layers=1, stage_list=(1,))
    facts = BackFacts(topology, {(0, 0, 0): rank}, {(0, 0, 0): ms})
    options = ckpt2pt.options_from_args(ckpt2pt.build_parser().parse_args(
        ["--ms-path", str(NOWHERE / "ms"), "--param-map-path", str(NOWHERE / "pt_meta"), "--megatron-path",
         str(NOWHERE / "back"), "--tp-size", "1", "--pp-size", "1", "--dp-size", "1", "--cp-size", "1",
         "--vpp-size", "1"]))
    job = plan_conversion(facts, options)
    [plan] = job.plans

    assert job.iteration == 12 and plan.out_dir == NOWHERE / "back" / "iter_0000012" / "mp_rank_00"
    assert dict(plan.args_updates) == {"consumed_train_samples": 60 + 2 * 6}
    assert plan.group_updates == ((0, "lr", 0.25),)
    assert plan.scheduler_updates == (("lr_decay_style", "linear"),)  # index 2 of Megatron's styles
    assert dict(plan.sources) == {(0, key, state): (ms_name if state == "param" else f"{state}.{ms_name}", None)
                                  for key, _, ms_name in PARAMS for state in STATES}
    model = {t.key: t for t in plan.targets if t.file == "model_optim_rng.pt"}
    assert {k: (t.shape, t.dtype) for k, t in model.items()} == {
        f"model.{key}": (shape, "torch.bfloat16") for key, shape, _ in PARAMS}
    buckets = [t for t in plan.targets if t.file == "distrib_optim.pt"]
    assert [t.shape for t in buckets] == [(total,)] * 3
    offsets = {ms_name: spans[key][0] for key, _, ms_name in PARAMS}
    laid = sorted(offsets.items(), key=lambda item: item[1])
    assert buckets[1].source == "zeros + " + ", ".join(f"{start}: exp_avg.{name}" for name, start in laid)
