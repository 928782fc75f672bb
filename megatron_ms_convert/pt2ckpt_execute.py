"""The forward direction's worker: executing one `RankPlan` (a Megatron (tp, pp[, ep]) folder -> one
MindSpore file and its copies, plus its pt_meta record), then, with --verify, reading the output back
with MindSpore. The mirror of `ckpt2pt_execute`; `runner.run_tasks` runs either in worker processes.
"""

from __future__ import annotations

import filecmp
import math
import sys

import numpy as np
import torch

from .atomic import atomic_target, copy_file_atomically
from .errors import VerificationError
from .manifest import write_manifest
from .megatron import checkpoint as reader
from .megatron.pt_meta import pt_meta_record
from .megatron.zip_records import BackgroundChecks
from .mindspore.writer import TensorEntry, write_mindspore_file
from .plan import BucketSlice, ModelTensor, PlannedTensor, RankPlan, Stacked, TargetRankPlan
from .rank_outputs import log_rank_end, mark_complete, verify_if_asked
from .runner import ByteCounter, Progress, RankResult, RunSettings, anon_memory_bytes, no_progress


class SourceTensors:
    """Hands out the data of planned tensors as numpy views of the mmap'd source files."""

    def __init__(self, plan: RankPlan):
        # every zip record is CRC-checked in a thread while the tensors are copied; see write_outputs
        self.checks = BackgroundChecks()
        self.model_sd = reader.load_pt(plan.folder.model_file, background=self.checks)
        # per optimizer (dense, then the experts' in a MoE run), its grad buffers
        self.buffers = ([reader.decode_optimizer_part(reader.load_pt(path, background=self.checks), path, element)
                         for path, element in plan.distrib_sources()] if plan.reads_distrib else None)
        self._by_name = {t.name: t for t in plan.tensors}
        self._flat: dict[str, dict[str, torch.Tensor]] = {}

    def array(self, planned: PlannedTensor) -> np.ndarray:
        return self._array(planned.source, planned.shape, planned.dtype)

    def _array(self, source, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        if isinstance(source, Stacked):
            return np.stack([self._array(part, shape[1:], dtype) for part in source.parts])
        if isinstance(source, BucketSlice):
            bucket = self.buffers[source.optimizer][source.gbuf_idx].states[source.state][source.bucket]
            tensor = bucket[source.start:source.end].view(shape)
        elif isinstance(source, ModelTensor):
            if source.chunk_key not in self._flat:
                self._flat[source.chunk_key] = reader.model_tensors(self.model_sd[source.chunk_key])
            tensor = self._flat[source.chunk_key][source.key]
        else:
            return np.array(source.value, dtype=dtype).reshape(shape)
        want = getattr(torch, dtype)
        if tensor.dtype != want:
            tensor = tensor.to(want)
        return tensor.numpy()

    def fetch(self, entry: TensorEntry) -> np.ndarray:
        return self.array(self._by_name[entry.name])


def work_bytes(plan: RankPlan | TargetRankPlan) -> int:
    """The bytes one phase of a plan (a folder's or a re-shard's target rank's) handles, for progress:
    its tensors' data, once per output file."""
    return tensor_bytes(plan) * len(plan.outputs)


def tensor_bytes(plan: RankPlan) -> int:
    return sum(math.prod(t.shape) * getattr(torch, t.dtype).itemsize for t in plan.tensors)


def execute_rank(plan: RankPlan, settings: RunSettings, write: bool = True,
                 progress: Progress = no_progress) -> RankResult:
    """Write one rank's output, its copies and its pt_meta args file (or, with write=False, only
    verify a complete output an earlier run left), reporting the bytes done to `progress`. An output
    that fails --verify is removed, so no final path ever holds a file that is not complete and correct."""
    sources = SourceTensors(plan)
    result = RankResult(plan.folder.name, "skipped")
    if write:
        write_manifest(plan, "writing")
        write_outputs(plan, sources, settings, result, progress)
        write_meta_file(plan, sources.model_sd)
        mark_complete(plan, result, len(plan.tensors))
    sources.checks.wait()
    verify_if_asked(plan, result, settings, progress, lambda counter: verify_rank(plan, sources, counter))
    log_rank_end(plan, result)
    return result


def write_outputs(plan, sources, settings: RunSettings, result: RankResult, progress: Progress) -> None:
    """Write `plan.outputs[0]` (a RankPlan's or a re-shard's TargetRankPlan's), each tensor fetched
    from `sources` as the writer needs it, then its copies; counts the bytes written and samples the
    worker's memory into `result`. `sources` has `fetch(entry)` and `checks` (the CRC checks of what
    it reads), which must all pass before the file is put at its final path."""
    entries = [TensorEntry(t.name, t.shape, t.dtype) for t in plan.tensors]
    fetch = _measuring_memory(_waiting_at(sources, entries[-1].name) if entries else sources.fetch, result)
    written = ByteCounter(progress, "write")
    fetch = _counting_bytes(fetch, written)
    if settings.debug and sys.stderr.isatty():
        fetch = _with_tensor_progress(fetch, len(entries), plan.folder.name)
    plan.outputs[0].parent.mkdir(parents=True, exist_ok=True)
    result.bytes_written = write_mindspore_file(plan.outputs[0], entries, fetch, plan.fmt)
    sources.checks.wait()  # waited for already, unless the file had no tensor
    for copy in plan.outputs[1:]:
        result.bytes_written += copy_file_atomically(plan.outputs[0], copy)
        written.add(tensor_bytes(plan))


def _waiting_at(sources, last: str):
    """sources.fetch, which also waits for the CRC checks when it hands out the tensor named `last`:
    the writer then has every tensor but has not yet put its file at the final path."""
    def fetch(entry: TensorEntry) -> np.ndarray:
        if entry.name == last:
            sources.checks.wait()
        return sources.fetch(entry)
    return fetch


def _measuring_memory(fetch, result: RankResult):
    """Sample RssAnon as each tensor is handed out, when the previous one is gone and this one exists."""
    def measured_fetch(entry):
        array = fetch(entry)
        result.peak_anon_bytes = max(result.peak_anon_bytes, anon_memory_bytes())
        return array
    return measured_fetch


def _counting_bytes(fetch, counter: ByteCounter):
    """fetch, which counts the bytes it hands out (the writer writes each tensor as it gets it)."""
    def counted_fetch(entry):
        array = fetch(entry)
        counter.add(array.nbytes)
        return array
    return counted_fetch


def _with_tensor_progress(fetch, total: int, label: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=label, unit="tensor", leave=False)

    def counting_fetch(entry):
        bar.update(1)
        return fetch(entry)
    return counting_fetch


def write_meta_file(plan: RankPlan, model_sd: dict) -> None:
    """pt_meta/args_tpTT_ppPPP.pt: what the way back (MindSpore -> Megatron) needs besides the tensors:
    the documented keys plus the skeletons, layouts and bucket sizes that make it exact. The bucket
    sizes come from the pickle of distrib_optim.pt (mmap'd: its tensors are not read), when it was read."""
    distrib = reader.load_pt(plan.folder.distrib_file) if plan.reads_distrib else None
    meta = pt_meta_record(model_sd, plan.folder.model_file, distrib, plan.layouts, plan.param_name_list,
                          expert_layouts=plan.expert_layouts, moe=dict(plan.moe) if plan.moe else None)
    del distrib
    with atomic_target(plan.meta_file) as partial, reader.megatron_enum_importable():
        torch.save(meta, partial)


def verify_rank(plan: RankPlan, sources: SourceTensors, counter: ByteCounter | None = None) -> tuple[int, int]:
    """Re-open the written file with MindSpore's own loader and compare every tensor bit for bit,
    counting the bytes compared."""
    import mindspore as ms  # only here: importing it costs seconds

    counter = counter or ByteCounter(no_progress, "verify")
    loaded = ms.load_checkpoint(str(plan.outputs[0]), format=plan.fmt)
    problems = []
    for planned in plan.tensors:
        if math.prod(planned.shape) == 0:
            continue  # MindSpore writes no record for an empty tensor
        got = loaded.get(planned.name)
        want = sources.array(planned)
        counter.add(want.nbytes)
        if got is None:
            problems.append(f"{planned.name}: missing")
            continue
        got = got.asnumpy()
        if got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != np.ascontiguousarray(want).tobytes():
            problems.append(f"{planned.name}: differs")
    extra = set(loaded) - {t.name for t in plan.tensors}
    problems += [f"{name}: not planned" for name in sorted(extra)]
    for copy in plan.outputs[1:]:
        if not filecmp.cmp(plan.outputs[0], copy, shallow=False):  # compares in chunks, not whole files
            problems.append(f"{copy}: differs from {plan.outputs[0]}")
        counter.add(tensor_bytes(plan))
    if problems:
        raise VerificationError(f"verification of {plan.outputs[0]} failed (output removed): "
                                + "; ".join(problems[:10]))
    return len([t for t in plan.tensors if math.prod(t.shape)]), len(plan.outputs)
