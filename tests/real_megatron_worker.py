"""One rank of a CPU training job run with the real megatron.core 0.6.0 (see tests/real_megatron.py).

Run as `python tests/real_megatron_worker.py JOB.pt RANK` with MASTER_ADDR/MASTER_PORT/WORLD_SIZE set.
The job is a spec (the fields of real_megatron.MegatronSpec) and a list of actions executed in order:
("train", n), ("save", root), ("load", root), ("dump", tag). The rank writes what it observed
(per-step losses and grad norms, dumps) to `<out_dir>/rank<RANK>.pt`.

What this file re-creates from megatron/training (not in the megatron-core package), following
Megatron-LM core_r0.6.0: get_model's wrapping (Float16Module, DDP), the random seeding, train_step,
pretrain_gpt's batch/loss functions, the optimizer-parameter scheduler, and save_checkpoint /
load_checkpoint for the non-distributed ('torch') checkpoint format. Everything below that — the
model, DDP buckets, the distributed optimizer, its save/load_parameter_state, the pipeline
schedules — is Megatron's own code.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace as Spec  # the job's MegatronSpec fields as attributes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "megatron_stubs"))
sys.path.insert(0, str(HERE.parent))

import cuda_on_cpu  # noqa: E402  (stubs first: Megatron's imports need them)

cuda_on_cpu.install_device_shims()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from megatron.core import parallel_state as mpu  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel as DDP  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

cuda_on_cpu.install_cpu_rng_tracker()

from tests.megatron_fixture import _ARGS_DEFAULTS  # noqa: E402  (the args a real r0.6.0 run saves)


# ----------------------------------------------------------------------------------------- setup

def set_random_seed(seed: int) -> None:
    """megatron/training/initialize.py _set_random_seed (data_parallel_random_init off)."""
    seed = seed + 100 * mpu.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(spec: Spec) -> TransformerConfig:
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
        ffn_hidden_size=spec.ffn, tensor_model_parallel_size=spec.tp, pipeline_model_parallel_size=spec.pp,
        virtual_pipeline_model_parallel_size=spec.vpp if spec.vpp > 1 else None, context_parallel_size=1,
        sequence_parallel=False, use_cpu_initialization=True, perform_initialization=True,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        hidden_dropout=spec.dropout, attention_dropout=spec.dropout, init_method_std=0.02,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        normalization="LayerNorm", add_bias_linear=spec.linear_bias, num_query_groups=spec.query_groups,
        gated_linear_unit=spec.swiglu, activation_func=F.silu if spec.swiglu else F.gelu,
        num_moe_experts=spec.num_experts, moe_router_topk=spec.moe_topk, expert_model_parallel_size=spec.ep)


def build_model(spec: Spec, config: TransformerConfig, param_map_dir: str | None = None) -> list:
    """get_model(): one GPTModel per virtual chunk, Float16Module, then DDP (bucketing off for chunks > 0).
    With param_map_dir, DDP is the one patch/param_map.patch made (the harness puts a patched copy of
    megatron.core first on the path) and records its buffers' layouts there, as the patched get_model does."""
    chunks = []
    for v in range(spec.vpp):
        if spec.vpp > 1:
            mpu.set_virtual_pipeline_model_parallel_rank(v)
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(spec.num_experts),
                         vocab_size=spec.padded_vocab, max_sequence_length=spec.seq,
                         pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=not spec.untie_embeddings,
                         position_embedding_type=spec.position_embedding, parallel_output=True)
        model.model_type = ModelType.encoder_or_decoder
        chunks.append(model)
    if spec.vpp > 1:
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    for model in chunks:
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return [DDP(config, Float16Module(config, model),
                data_parallel_group=mpu.get_data_parallel_group(with_context_parallel=True),
                expert_data_parallel_group=mpu.get_data_modulo_expert_parallel_group(),
                accumulate_allreduce_grads_in_fp32=True, overlap_grad_reduce=spec.overlap_grad_reduce,
                use_distributed_optimizer=True, disable_bucketing=(i > 0), check_for_nan_in_grad=True,
                bucket_size=spec.bucket_size,
                **({"param_map_dir": param_map_dir, "model_chunk_idx": i} if param_map_dir else {}))
            for i, model in enumerate(chunks)]


def build_optimizer(spec: Spec, model: list):
    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=spec.lr, min_lr=spec.min_lr, weight_decay=spec.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, bf16=True, params_dtype=torch.bfloat16,
        use_distributed_optimizer=True, overlap_grad_reduce=spec.overlap_grad_reduce, clip_grad=1.0), model)


class ParamScheduler:
    """megatron/training/optimizer_param_scheduler.py (r0.6.0), linear warmup then cosine decay, constant
    weight decay: sets every group's lr (scaled by its lr_mult, bounded by its max/min_lr) and
    weight_decay (scaled by wd_mult) each step; state_dict() has the fields Megatron saves."""

    def __init__(self, optimizer, spec: Spec):
        self.optimizer = optimizer
        self.max_lr, self.min_lr = spec.lr, spec.min_lr
        self.lr_warmup_steps = spec.warmup_iters * spec.global_batch
        self.lr_decay_steps = spec.decay_iters * spec.global_batch
        self.wd = spec.weight_decay
        self.num_steps = 0
        self.step(0)

    def get_lr(self, group) -> float:
        max_lr, min_lr = group.get("max_lr", self.max_lr), group.get("min_lr", self.min_lr)
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return max_lr * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        ratio = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps, "num_steps": self.num_steps,
                "lr_decay_style": "cosine", "lr_decay_steps": self.lr_decay_steps, "min_lr": self.min_lr,
                "start_wd": self.wd, "end_wd": self.wd, "wd_incr_style": "constant",
                "wd_incr_steps": self.lr_decay_steps}

    def load_state_dict(self, sd: dict) -> None:
        assert (sd["max_lr"], sd["min_lr"], sd["lr_warmup_steps"], sd["lr_decay_steps"]) == (
            self.max_lr, self.min_lr, self.lr_warmup_steps, self.lr_decay_steps), sd
        self.step(increment=sd["num_steps"])


class Trainer:
    """The state of one rank: model chunks, optimizer, scheduler, counters."""

    def __init__(self, spec: Spec, param_map_dir: str | None = None):
        self.spec = spec
        self.config = transformer_config(spec)
        self.model = build_model(spec, self.config, param_map_dir)
        self.optimizer = build_optimizer(spec, self.model)
        self.scheduler = ParamScheduler(self.optimizer, spec)
        self.iteration = 0
        self.consumed_train_samples = 0
        self.flops_so_far = 0
        self._wire_config()

    def _wire_config(self) -> None:
        """megatron/training/training.py train(): the hooks the schedules call."""
        config, model = self.config, self.model
        config.grad_scale_func = self.optimizer.scale_loss
        config.timers = None
        if self.spec.overlap_grad_reduce:
            config.no_sync_func = [m.no_sync for m in model]
            config.grad_sync_func = [m.start_grad_sync for m in model]  # delay_grad_reduce defaults on
            if len(model) == 1:
                config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], config.grad_sync_func[0]
        config.finalize_model_grads_func = finalize_model_grads


# -------------------------------------------------------------------------------------- training

def microbatch(spec: Spec, iteration: int, index: int) -> tuple:
    """Deterministic synthetic tokens of (iteration, micro-batch, dp rank), independent of tp and pp
    (spec.data "random": uniform; "repeated": each sequence's second half repeats its first); pretrain_gpt's get_batch
    fields: tokens, labels, loss_mask, causal attention_mask (True = masked), position_ids."""
    dp_rank = mpu.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + iteration * 10_007 + index * 101 + dp_rank)
    text = torch.randint(0, spec.vocab, (spec.micro_batch, spec.seq + 1), generator=gen)
    if spec.data == "repeated":  # the second half repeats the first: attention has something to learn
        half = (spec.seq + 1) // 2
        text[:, half:] = text[:, :spec.seq + 1 - half]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones(spec.micro_batch, spec.seq, dtype=torch.float)
    attention_mask = torch.tril(torch.ones(1, 1, spec.seq, spec.seq)) < 0.5
    position_ids = torch.arange(spec.seq).unsqueeze(0).expand(spec.micro_batch, -1).contiguous()
    return tokens, labels, loss_mask, attention_mask, position_ids


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.loss_func (cp = 1) with the dp-averaged loss for logging."""
    losses = output_tensor.float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
    assert not loss.isnan()
    averaged = loss.clone().detach().view(1)
    torch.distributed.all_reduce(averaged, group=mpu.get_data_parallel_group())
    averaged = averaged / torch.distributed.get_world_size(group=mpu.get_data_parallel_group())
    return loss, {"lm loss": averaged[0]}


def forward_step(data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = next(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def flops_per_iteration(spec: Spec) -> float:
    """training.num_floating_point_operations (no GQA, no MoE, no swiglu)."""
    h, L, s = spec.hidden, spec.num_layers, spec.seq
    return (12 * spec.global_batch * s * L * h * h
            * (1 + spec.ffn / h + 1 + s / h + spec.padded_vocab / (2 * L * h)))


def train_step(t: Trainer) -> tuple[float, float]:
    """megatron/training/training.py train_step; returns the iteration's mean 'lm loss' (last stage,
    nan on other stages) and the gradient norm the optimizer clipped with (every rank: Megatron
    reduces it over the model-parallel group)."""
    spec = t.spec
    for chunk in t.model:
        chunk.zero_grad_buffer()
    t.optimizer.zero_grad()
    batches = [microbatch(spec, t.iteration, i) for i in range(spec.num_microbatches)]
    data_iterator = [iter(batches) for _ in t.model] if spec.vpp > 1 else iter(batches)
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator,
        model=t.model if spec.vpp > 1 else t.model[0], num_microbatches=spec.num_microbatches,
        seq_length=spec.seq, micro_batch_size=spec.micro_batch, decoder_seq_length=spec.seq,
        forward_only=False)
    update_successful, grad_norm, _zeros = t.optimizer.step()
    assert update_successful
    t.scheduler.step(increment=spec.num_microbatches * spec.micro_batch * spec.dp)
    t.iteration += 1
    t.consumed_train_samples += spec.global_batch
    t.flops_so_far += flops_per_iteration(spec)
    if not mpu.is_pipeline_last_stage(ignore_virtual=True):
        return float("nan"), float(grad_norm)
    return float(torch.stack([x["lm loss"] for x in losses_reduced]).mean()), float(grad_norm)


# ---------------------------------------------------------------------------------- checkpointing

def checkpoint_dir(root: Path, iteration: int) -> Path:
    """get_checkpoint_name: iter_%07d/mp_rank_TT, then _PPP with pipeline parallelism, then _EEE with
    expert parallelism."""
    name = f"mp_rank_{mpu.get_tensor_model_parallel_rank():02d}"
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{mpu.get_pipeline_model_parallel_rank():03d}"
    if mpu.get_expert_model_parallel_world_size() > 1:
        name += f"_{mpu.get_expert_model_parallel_rank():03d}"
    return Path(root) / f"iter_{iteration:07d}" / name


def rng_state() -> list:
    """get_rng_state without the CUDA generator (there is none; the CPU generator plays its part)."""
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]


def saved_args(t: Trainer, root: Path) -> argparse.Namespace:
    spec = t.spec
    a = dict(_ARGS_DEFAULTS)
    a.update(
        num_layers=spec.num_layers, encoder_num_layers=spec.num_layers, hidden_size=spec.hidden,
        ffn_hidden_size=spec.ffn, num_attention_heads=spec.heads, kv_channels=spec.hidden // spec.heads,
        num_query_groups=spec.query_groups or spec.heads, group_query_attention=spec.query_groups is not None,
        add_bias_linear=spec.linear_bias, position_embedding_type=spec.position_embedding,
        use_rotary_position_embeddings=spec.position_embedding == "rope", swiglu=spec.swiglu,
        max_position_embeddings=spec.seq, seq_length=spec.seq, encoder_seq_length=spec.seq,
        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by, vocab_size=spec.vocab,
        padded_vocab_size=spec.padded_vocab, untie_embeddings_and_output_weights=spec.untie_embeddings,
        micro_batch_size=spec.micro_batch, global_batch_size=spec.global_batch,
        use_mcore_models=True, normalization="LayerNorm",
        hidden_dropout=spec.dropout, attention_dropout=spec.dropout,
        save=str(root), bf16=True, fp16=False, params_dtype=torch.bfloat16,
        tensor_model_parallel_size=spec.tp, pipeline_model_parallel_size=spec.pp,
        transformer_pipeline_model_parallel_size=spec.pp,
        virtual_pipeline_model_parallel_size=spec.vpp if spec.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=spec.num_layers // (spec.pp * spec.vpp) if spec.vpp > 1 else None,
        data_parallel_size=spec.dp, context_parallel_size=1, expert_model_parallel_size=spec.ep,
        num_experts=spec.num_experts, moe_router_topk=spec.moe_topk,
        use_distributed_optimizer=True, overlap_grad_reduce=spec.overlap_grad_reduce,
        accumulate_allreduce_grads_in_fp32=True, lr=spec.lr, min_lr=spec.min_lr, weight_decay=spec.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, seed=spec.seed,
        lr_warmup_iters=spec.warmup_iters, lr_decay_iters=spec.decay_iters, lr_decay_style="cosine",
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        model_type=ModelType.encoder_or_decoder, iteration=t.iteration,
        consumed_train_samples=t.consumed_train_samples, num_floating_point_operations_so_far=t.flops_so_far)
    return argparse.Namespace(**a)


def unwrapped(t: Trainer) -> list:
    """unwrap_model: DDP and Float16Module removed."""
    return [chunk.module.module for chunk in t.model]


def save_checkpoint(t: Trainer, root: Path) -> None:
    """save_checkpoint (non-distributed format): distrib_optim.pt from dp rank 0, model_optim_rng.pt
    from every rank with data_modulo_expert_parallel rank 0, then the tracker file from rank 0."""
    folder = checkpoint_dir(root, t.iteration)
    rng = rng_state()
    folder.mkdir(parents=True, exist_ok=True)
    t.optimizer.save_parameter_state(str(folder / "distrib_optim.pt"))
    if mpu.get_data_modulo_expert_parallel_rank() == 0:
        state = {"args": saved_args(t, root), "checkpoint_version": 3.0, "iteration": t.iteration}
        models = unwrapped(t)
        if len(models) == 1:
            state["model"] = models[0].state_dict_for_save_checkpoint()
        else:
            for i, m in enumerate(models):
                mpu.set_virtual_pipeline_model_parallel_rank(i)
                state[f"model{i}"] = m.state_dict_for_save_checkpoint()
        state["optimizer"] = t.optimizer.state_dict()
        state["opt_param_scheduler"] = t.scheduler.state_dict()
        state["rng_state"] = rng
        state["num_floating_point_operations_so_far"] = t.flops_so_far
        torch.save(state, folder / "model_optim_rng.pt")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(t.iteration))
    torch.distributed.barrier()


def load_checkpoint(t: Trainer, root: Path) -> None:
    """load_checkpoint (non-distributed format, not finetuning): model, optimizer, distrib_optim.pt via
    load_parameter_state, scheduler, rng states."""
    iteration = int((Path(root) / "latest_checkpointed_iteration.txt").read_text().strip())
    folder = checkpoint_dir(root, iteration)
    state = torch.load(folder / "model_optim_rng.pt", weights_only=False)
    t.iteration = state["iteration"]
    t.consumed_train_samples = getattr(state["args"], "consumed_train_samples", 0)
    t.flops_so_far = state.get("num_floating_point_operations_so_far", 0)
    assert state["args"].tensor_model_parallel_size == t.spec.tp
    assert state["args"].pipeline_model_parallel_size == t.spec.pp
    models = unwrapped(t)
    if len(models) == 1:
        models[0].load_state_dict(state["model"], strict=True)
    else:
        for i, m in enumerate(models):
            mpu.set_virtual_pipeline_model_parallel_rank(i)
            m.load_state_dict(state[f"model{i}"], strict=True)
    t.optimizer.load_state_dict(state["optimizer"])
    t.optimizer.load_parameter_state(str(folder / "distrib_optim.pt"))
    t.scheduler.load_state_dict(state["opt_param_scheduler"])
    rng = state["rng_state"][0]
    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    torch.set_rng_state(rng["torch_rng_state"])
    if not rng["rng_tracker_states"]:
        raise KeyError("rng_tracker_states")
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])
    torch.distributed.barrier()


# ------------------------------------------------------------------------------------------- dump

def strip_module(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != "module")


def dump_state(t: Trainer) -> dict:
    """Every parameter of this rank by name: the fp32 main param and Adam moments gathered with
    Megatron's own get_parameter_state_dp_zero (cut out of the buckets with DDP's param_index_map),
    and the bf16 model copy. Collective over the dp groups; a rank returns the parameters of the
    optimizers whose dp group it leads: the dense ones on dp rank 0, the expert-parallel ones (MoE,
    keys with an `ep{e}/` part) on each expert-data-parallel rank 0. Before the first step (no moments
    yet) only the bf16 model copies, under "model", and no "ranks" entry."""
    tp, pp, ep = (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(),
                  mpu.get_expert_model_parallel_rank())
    optimizers = getattr(t.optimizer, "chained_optimizers", [t.optimizer])
    kinds = [("buffers", mpu.get_data_parallel_rank(), f"tp{tp}/pp{pp}", (tp, pp)),
             ("expert_parallel_buffers", mpu.get_data_modulo_expert_parallel_rank(), f"tp{tp}/pp{pp}/ep{ep}",
              (tp, pp, ep))][:len(optimizers)]
    out = {"params": {}, "ranks": {}}
    param_groups = t.optimizer.state_dict()
    for optimizer, (attr, dp_rank, prefix, rank_key) in zip(optimizers, kinds):
        if not optimizer.optimizer.state:  # before the first step Adam has no moments: the weights alone
            if dp_rank == 0:
                out["params"].update(_model_params_by_name(t, attr, prefix))
            continue
        gathered = optimizer.get_parameter_state_dp_zero()
        if dp_rank != 0:
            continue
        out["params"].update(_params_by_name(t, gathered, attr, prefix))
        out["ranks"][rank_key] = {
            "per_bucket_numel": gathered["per_bucket_numel"],
            "per_bucket_numel_unpadded": gathered["per_bucket_numel_unpadded"],
            "param_groups": (param_groups["optimizer"]["param_groups"] if len(optimizers) == 1
                             else [sd["optimizer"]["param_groups"] for sd in param_groups]),
            "scheduler": t.scheduler.state_dict(), "iteration": t.iteration,
            "layer_offset": {(tp, pp, v): (m.decoder.layers[0].layer_number - 1 if len(m.decoder.layers) else None)
                             for v, m in enumerate(unwrapped(t))}}
    return out


def _model_params_by_name(t: Trainer, attr: str, prefix: str) -> dict:
    """{prefix/chunk{v}/name: {"model": the bf16 parameter}} for the buffers `attr` of every chunk."""
    out = {}
    for v, chunk in enumerate(t.model):
        names = {p: strip_module(n) for n, p in chunk.named_parameters()}
        for buffer in getattr(chunk, attr):
            out.update({f"{prefix}/chunk{v}/{names[param]}": {"model": param.detach().clone()}
                        for param in buffer.param_index_map})
    return out


def _params_by_name(t: Trainer, gathered: dict, attr: str, prefix: str) -> dict:
    """{prefix/chunk{v}/name: tensors} for the buffers `attr` of every chunk, whose gbuf_idx count
    on across chunks as the optimizer chains them."""
    out = {}
    gbuf_idx = 0
    for v, chunk in enumerate(t.model):
        names = {p: strip_module(n) for n, p in chunk.named_parameters()}
        for buffer in getattr(chunk, attr):
            dtype_key = (buffer.param_dtype, buffer.grad_dtype)
            for param, (start, end, bucket_id) in buffer.param_index_map.items():
                offset = buffer.buckets[bucket_id].offset
                entry = {key: gathered[gbuf_idx][dtype_key][key][bucket_id][start - offset:end - offset]
                         .clone().view(param.shape) for key in ("param", "exp_avg", "exp_avg_sq")}
                entry["model"] = param.detach().clone()
                entry["bucket"] = (gbuf_idx, bucket_id, start - offset, end - offset)
                out[f"{prefix}/chunk{v}/{names[param]}"] = entry
            gbuf_idx += 1
    return out


# ------------------------------------------------------------------------------------------- main

def run(job: dict, rank: int) -> dict:
    spec = Spec(**job["spec"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=spec.tp * spec.pp * spec.dp)
    mpu.initialize_model_parallel(spec.tp, spec.pp, spec.vpp if spec.vpp > 1 else None,
                                  expert_model_parallel_size=spec.ep)
    set_random_seed(spec.seed)
    t = Trainer(spec, job.get("param_map_dir"))
    result = {"losses": [], "grad_norms": [], "dumps": {}}
    for action, arg in job["actions"]:
        if action == "train":
            for _ in range(arg):
                loss, grad_norm = train_step(t)
                result["losses"].append(loss)
                result["grad_norms"].append(grad_norm)
        elif action == "save":
            save_checkpoint(t, Path(arg))
        elif action == "load":
            load_checkpoint(t, Path(arg))
        elif action == "dump":
            result["dumps"][arg] = dump_state(t)
        else:
            raise ValueError(f"unknown action {action!r}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return result


def main(argv: list[str]) -> int:
    job_file, rank = Path(argv[0]), int(argv[1])
    job = torch.load(job_file, weights_only=False)
    result = run(job, rank)
    out = Path(job["out_dir"]) / f"rank{rank}.pt"
    torch.save(result, out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
