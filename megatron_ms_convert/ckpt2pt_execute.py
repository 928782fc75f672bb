"""The way back's worker: executing one `BackPlan` (one MindSpore rank file -> the Megatron folder's
distrib_optim.pt and model_optim_rng.pt), then, with --verify, reading the outputs back with
torch.load. The mirror of `pt2ckpt_execute`; `runner.run_tasks` runs either in worker processes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch

from .ckpt2pt_facts import read_rank_meta
from .errors import VerificationError
from .manifest import write_manifest
from .megatron.checkpoint import flatten_state_dict, load_pt, megatron_enum_importable, optimizer_param_groups
from .megatron.layout import state_key_for
from .megatron.pt_meta import DOCUMENTED_KEYS
from .megatron.torch_writer import write_torch_file
from .megatron.writer import (OPTIMIZER_STATES, TrainingUpdates, apply_training_updates, distrib_optim_tree,
                              model_optim_rng_tree, skeleton_specs, target_counts)
from .mindspore.bucket_form import open_rank_source
from .mindspore.reader import MindSporeFile
from .plan import BackPlan, RankMeta, StatePart
from .rank_outputs import log_rank_end, mark_complete, verify_if_asked
from .reshard.assemble import assemble_tensor, replica_policy_check
from .runner import ByteCounter, Progress, RankResult, RunSettings, anon_memory_bytes, no_progress
from .topology import DISTRIB_FILE, MODEL_FILE


def restored_entries(meta: dict, plan: BackPlan) -> dict:
    """model_optim_rng.pt's non-model entries: pt_meta's, with the values training changed."""
    entries = {key: meta.get(key) for key in DOCUMENTED_KEYS}
    updates = dict(plan.args_updates)
    iteration = plan.iteration if plan.iteration != meta.get("iteration") else None
    entries = apply_training_updates(entries, TrainingUpdates(
        iteration=iteration, consumed_train_samples=updates.pop("consumed_train_samples", None)))
    if updates:
        args = copy.copy(entries["args"])
        for key, value in updates.items():
            setattr(args, key, value)
        entries["args"] = args
    if plan.group_updates:
        entries["optimizer"] = copy.deepcopy(entries["optimizer"])
        groups = optimizer_param_groups(entries["optimizer"])  # numbered on across a MoE run's two optimizers
        for i, key, value in plan.group_updates:
            groups[i][key] = value
    if plan.scheduler_updates:
        entries["opt_param_scheduler"] = dict(entries["opt_param_scheduler"], **dict(plan.scheduler_updates))
    return entries


class RankSources:
    """The MindSpore tensors of one plan, by (chunk, local state-dict key, state), as flat fp32 views
    (one row of a stacked expert tensor for an expert parameter)."""

    def __init__(self, plan: BackPlan, ms: MindSporeFile):
        self.ms = ms
        self.names = dict(plan.sources)
        self.peak_anon_bytes = 0  # sampled as each tensor is handed out, while a bucket is being filled

    def value(self, chunk: int, key: str, state: str) -> torch.Tensor:
        source = self.names.get((chunk, key, state))
        if source is None:
            raise ValueError(f"{self.ms.path}: no source planned for chunk {chunk} {key} {state}")
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_memory_bytes())
        name, row = source
        return (self.ms.read(name) if row is None else self.ms.read_row(name, row)).reshape(-1)

    def state_value(self, chunk: int, ddp_name: str, state: str) -> torch.Tensor:
        return self.value(chunk, state_key_for(ddp_name), state)

    def model_value(self, chunk: int, key: str) -> torch.Tensor:
        return self.value(chunk, key, "param")


def work_bytes(plan: BackPlan) -> int:
    """The bytes one phase of a plan handles, for progress: the data of the tensors it writes."""
    return sum(math.prod(t.shape) * getattr(torch, t.dtype.removeprefix("torch.")).itemsize for t in plan.targets)


class ReshardSources:
    """The tensors of a re-sharding plan, each assembled from its segments in several MindSpore files
    (mmap'd: a segment reads the bytes of its box); the interface of `RankSources`."""

    def __init__(self, plan: BackPlan, files: dict):
        self.files = files  # source RankCoord -> open MindSporeFile
        self.tensors = dict(plan.reshard)
        self.check = replica_policy_check(plan.replica_policy, lambda s: f"{files[s.source].path}")
        self.peak_anon_bytes = 0

    def read_flat(self, segment) -> torch.Tensor:
        return self.files[segment.source].read(segment.key).reshape(-1)

    def value(self, chunk: int, key: str, state: str) -> torch.Tensor:
        target = self.tensors.get((chunk, key, state))
        if target is None:
            raise ValueError(f"no source planned for chunk {chunk} {key} {state}")
        out = assemble_tensor(target, self.read_flat, replica_check=self.check)
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_memory_bytes())
        return out.reshape(-1)

    state_value = RankSources.state_value
    model_value = RankSources.model_value


@contextlib.contextmanager
def opened_sources(plan: BackPlan):
    """The plan's sources, their files open (and CRC-checked) for as long as the block runs."""
    with contextlib.ExitStack() as stack:
        if not plan.reshard:
            ms = stack.enter_context(open_rank_source(plan.source_file, plan.fmt, plan.bucket))
            ms.check_crc()  # a crc_check=True save's CRC, before anything is written
            yield RankSources(plan, ms)
            return
        files = {}
        for rank, path in plan.source_paths:
            files[rank] = stack.enter_context(open_rank_source(path, plan.fmt))
            files[rank].check_crc()
        yield ReshardSources(plan, files)


def execute_rank(plan: BackPlan, settings: RunSettings, write: bool = True,
                 progress: Progress = no_progress) -> RankResult:
    """Write one rank's distrib_optim.pt and model_optim_rng.pt (or, with write=False, only verify a
    complete output of an earlier run), reporting the bytes done to `progress`. Files appear under
    their final names only when complete; an output that fails --verify is removed."""
    rank = plan.rank_meta or read_rank_meta(plan.pt_meta_file, plan.write_distrib, plan.folder.tp, plan.folder.pp,
                                            plan.num_chunks)
    result = RankResult(plan.folder.name, "skipped")
    with opened_sources(plan) as sources:
        if write:
            write_manifest(plan, "writing")
            plan.out_dir.mkdir(parents=True, exist_ok=True)
            written = ByteCounter(progress, "write")
            if plan.write_distrib:
                write_torch_file(plan.out_dir / DISTRIB_FILE, distrib_optim_content(rank, plan, sources.state_value),
                                 on_record=lambda key, nbytes: written.add(nbytes))
            tree = model_optim_rng_tree(restored_entries(rank.meta, plan), rank.skeletons, sources.model_value,
                                        rank.meta.get("state_keys"))
            with megatron_enum_importable():
                write_torch_file(plan.out_dir / MODEL_FILE, tree, on_record=lambda key, nbytes: written.add(nbytes))
            mark_complete(plan, result, len(plan.sources or plan.reshard))
            result.bytes_written = sum(p.stat().st_size for p in plan.outputs)
        verify_if_asked(plan, result, settings, progress,
                        lambda counter: (verify_rank(plan, rank, sources, counter), len(plan.outputs)))
        result.peak_anon_bytes = sources.peak_anon_bytes  # sampled while verifying too
    log_rank_end(plan, result)
    return result


def distrib_optim_content(rank: RankMeta, plan: BackPlan, state_value) -> Any:
    """distrib_optim.pt's tree: one dict, or for a MoE run with expert parallelism the list
    `[dense, expert]` Megatron's ChainedOptimizer saves (None where it saves None)."""
    trees = [None if part is None else distrib_optim_tree(part.layouts, part.counts, plan.padded_for(part), state_value)
             for part in rank.distrib_parts()]
    return trees if rank.list_form else trees[0]


def verify_rank(plan: BackPlan, rank: RankMeta, sources: RankSources, counter: ByteCounter | None = None) -> int:
    """Re-open the written files and compare every tensor with its MindSpore source, bit for bit
    (buckets outside their parameters must be zeros), counting the bytes compared; returns how many
    tensors were compared."""
    counter = counter or ByteCounter(no_progress, "verify")
    problems: list[str] = []
    compared = 0
    model = load_pt(plan.out_dir / MODEL_FILE)
    for chunk, skeleton in enumerate(rank.skeletons):
        chunk_key = "model" if len(rank.skeletons) == 1 else f"model{chunk}"
        flat = dict(flatten_state_dict(model.get(chunk_key, {})))
        for key, spec in skeleton_specs(skeleton):
            got = flat.get(key)
            want = sources.model_value(chunk, key).reshape(spec.shape).to(spec.dtype)
            if got is None or not _bitwise_equal(got, want):
                problems.append(f"{MODEL_FILE} {chunk_key}.{key}")
            compared += 1
            counter.add(want.numel() * want.element_size())
    if model.get("iteration") != plan.iteration:
        problems.append(f"{MODEL_FILE} iteration {model.get('iteration')} != {plan.iteration}")
    if plan.write_distrib:
        distrib = load_pt(plan.out_dir / DISTRIB_FILE)
        saved = distrib if rank.list_form else [distrib]
        for part, tree in zip(rank.distrib_parts(), saved):
            if part is None:
                if tree is not None:
                    problems.append(f"{DISTRIB_FILE}: a dense state where Megatron saves None")
                continue
            compared += verify_state_part(part, tree, plan.padded_for(part), sources, problems, counter)
    if problems:
        raise VerificationError(f"verification of {plan.out_dir} failed (outputs removed): " + "; ".join(problems[:10]))
    return compared


def verify_state_part(part: StatePart, tree: dict, dp_cp: int, sources: RankSources, problems: list[str],
                      counter: ByteCounter) -> int:
    """Compare one optimizer's buckets with the MindSpore values, parameter by parameter; the padding
    must be zeros. Appends what differs to `problems`; returns how many tensors were compared."""
    compared = 0
    for gbuf, (layout, target) in enumerate(zip(part.layouts, target_counts(part.counts, dp_cp))):
        [(dtype_key, by_state)] = tree[gbuf].items()
        for state in OPTIMIZER_STATES:
            for bucket, tensor in enumerate(by_state[state]):
                covered = torch.zeros(tensor.numel(), dtype=torch.bool)
                source = part.counts[gbuf]
                for span in layout.params:
                    if span.bucket != bucket:
                        continue
                    offset = span.start - source.bucket_start(bucket)
                    want = sources.state_value(layout.chunk, span.name, state)
                    if not _bitwise_equal(tensor[offset:offset + span.numel], want):
                        problems.append(f"{DISTRIB_FILE} {span.name} {state}")
                    covered[offset:offset + span.numel] = True
                    compared += 1
                if tensor.numel() != target.padded[bucket] or tensor[~covered].view(torch.int32).any():
                    problems.append(f"{DISTRIB_FILE} {part.kind} buffer {gbuf} {state} bucket {bucket}: "
                                    "size or padding")
                counter.add(tensor.numel() * tensor.element_size())
    return compared


def _bitwise_equal(got: Any, want: torch.Tensor) -> bool:
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.numel() != want.numel():
        return False
    return got.reshape(-1).contiguous().view(torch.uint8).equal(want.reshape(-1).contiguous().view(torch.uint8))
