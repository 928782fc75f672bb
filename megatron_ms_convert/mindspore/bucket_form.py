"""MindSpeed-Core-MS's DistributedOptimizer checkpoints ("bucket form"): one more reader of MindSpore files.

With `wrap_with_ddp` and `use_distributed_optimizer` on, mindspeed_ms saves no named parameter: every
rank's file holds its data-parallel slice of each flattened bucket (`buffer_<b>_bucket_<k>`,
`exp_avg.…`, `exp_avg_sq.…`, fp32) and the scalars, and dp rank 0 of each group writes the layout,
`opt_shard_info/rank_<r>/dist_opt_shard_info_rank_<r>-0_0.json`, when its optimizer is built. This
module turns that into what the way back reads from a name-keyed file, without a combine step:

facts   `bucket_source` finds the layout JSON and the same-step file of every dp rank of a group;
        `read_layout_json` parses the JSON strictly;
plan    `plan_layout` maps every element of every parameter to (dp rank, offset in that rank's shard)
        as frozen `Segment`s, checked against the shard sizes in the files' headers, without reading
        tensor data;
read    `BucketRankFile` answers like `MindSporeFile` (names, info, read, ...): `read(name)` gathers
        the parameter, `exp_avg.<name>` or `exp_avg_sq.<name>` from the mmap'd shards, at most one
        parameter in memory, never a bucket or a dp group.

The layout rules (MINDSPEED_DISTOPT.md §2, mindspeed_ms 697e48e): parameters are placed in reverse
module order; with `enable_mem_align` each takes a 512-byte-aligned slot, so there are gaps; each
bucket is padded (dp·512 bytes with mem align, else dp bytes) and cut into dp equal shards of
`bucket_numel // dp` elements. The JSON records each parameter's [start, end) in its buffer, so the
reader needs only that and the bucket sizes, whatever the alignment was. When `bucket_numel % dp`
is not 0 (possible without mem align) the last elements are in no shard: they were never saved.

Example (the worked example of the tp2dp2 sample: `word_embeddings.weight`, 512 elements at buffer
[5632, 6144) in bucket 3 = [5120, 6400) of 1280 elements, dp 2):

    >>> info = {"dp_rank_list": [0, 2],
    ...         "param_info": {"w": {"range_map": [0, 3, 5632, 6144], "shape": [32, 16], "dtype": "float32"}},
    ...         "buffer_info": {"0": {"buckets": {"0": [1536, 1536], "1": [1792, 1792], "2": [1792, 1792],
    ...                                           "3": [1280, 1152]}, "buffer_size": 6400, "bucket_num": 4}}}
    >>> shards = {(0, 0): 768, (0, 1): 896, (0, 2): 896, (0, 3): 640}
    >>> print(plan_layout(info, Path("j.json"), shards, Path("f.ckpt")).describe())
    bucket form of j.json: dp ranks 0, 2
      w [32, 16] float32: buffer 0 bucket 3: [0, 128) <- dp 0 [512, 640); [128, 512) <- dp 1 [0, 384)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConvertInputError
from ..flags import MS_FORMS
from .reader import MindSporeFile, StoredTensor, open_mindspore_file

__all__ = ["BUCKET_KEY", "Segment", "ParamPlace", "BucketLayout", "BucketSource", "BucketRankFile",
           "file_form", "form_of_file", "choose_rank_file", "bucket_source", "read_layout_json", "plan_layout",
           "open_bucket_form", "open_rank_source", "layout_json_path", "rank_source", "describe_source"]

BUCKET_KEY = re.compile(r"^(exp_avg\.|exp_avg_sq\.)?buffer_(\d+)_bucket_(\d+)$")
STATE_PREFIXES = ("", "exp_avg.", "exp_avg_sq.")
# mindspeed_ms names its files <prefix>_rank_<r>-<epoch>_<step>.<format> (checkpointing.py:84-85)
RANK_FILE = re.compile(r"^(?P<prefix>.*)_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.(?P<fmt>ckpt|safetensors)$")
FORMS = MS_FORMS

FIX_JSON = ("pass --opt-shard-info with the opt_shard_info folder of the run that saved this checkpoint (the JSON "
            "is rewritten at every start of a run, into that run's output_dir)")


@dataclass(frozen=True)
class Segment:
    """Elements [start, start + length) of a parameter (flattened) are elements [offset, offset + length)
    of the shard tensor of dp rank `dp` (an index into the group's dp ranks)."""

    start: int
    dp: int
    offset: int
    length: int


@dataclass(frozen=True)
class ParamPlace:
    """Where one parameter's elements are: its bucket's key and the segments covering it, in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the parameter's own dtype in the run (the shards are fp32 whatever it is)
    buffer: int
    bucket: int
    segments: tuple[Segment, ...]

    def key(self, prefix: str = "") -> str:
        return f"{prefix}buffer_{self.buffer}_bucket_{self.bucket}"

    def describe(self) -> str:
        pieces = "; ".join(f"[{s.start}, {s.start + s.length}) <- dp {s.dp} [{s.offset}, {s.offset + s.length})"
                           for s in self.segments)
        return f"{self.name} {list(self.shape)} {self.dtype}: buffer {self.buffer} bucket {self.bucket}: {pieces}"


@dataclass(frozen=True)
class BucketLayout:
    """A (tp, pp) group's layout: its dp ranks (global rank numbers, dp order) and every parameter's place."""

    json_path: Path
    dp_ranks: tuple[int, ...]
    shard_numel: tuple[tuple[tuple[int, int], int], ...]  # ((buffer, bucket), elements per dp shard)
    params: tuple[ParamPlace, ...]

    def describe(self) -> str:
        lines = [f"bucket form of {self.json_path}: dp ranks {', '.join(map(str, self.dp_ranks))}"]
        return "\n".join(lines + [f"  {place.describe()}" for place in self.params])


@dataclass(frozen=True)
class BucketSource:
    """How to open one (tp, pp) group in the bucket form: its layout JSON and the same-step file of each
    dp rank, in dp order (files[0] is the dp-rank-0 file the rank folder names)."""

    layout_json: Path
    files: tuple[Path, ...]

    @property
    def inputs(self) -> tuple[Path, ...]:
        return (self.layout_json, *self.files[1:])


# ---------------------------------------------------------------------------------------------
# Facts: which form, which files, which layout


def file_form(names: Sequence[str]) -> str:
    """'bucket' when any tensor is a bucket shard (mindspeed_ms's own test is the same: its loader picks
    the dp-zero path when a key names a buffer and a bucket), else 'named'.

    >>> file_form(["buffer_0_bucket_0", "exp_avg.buffer_0_bucket_0", "step_num"]), file_form(["a.weight"])
    ('bucket', 'named')
    """
    return "bucket" if any(BUCKET_KEY.match(n) for n in names) else "named"


def form_of_file(path: Path, fmt: str) -> str:
    with open_mindspore_file(path, fmt) as ms:
        return file_form(ms.names())


def choose_rank_file(rank_dir: Path, fmt: str, form: str | None, pick: Callable[[Path, str], Path]) -> tuple[Path, str]:
    """The file to read in a rank folder and its form. `pick` is the way back's usual choice (meta.json's
    `last_ckpt_file`, else the newest). A folder may hold both forms (combine_ckpt_dp_zero.py run in
    place writes `*_dp_merged` files beside the bucket files, and meta.json still names a bucket file):
    without `form` the usual choice and the newest file must be of one form, with it the usual choice
    if of that form, else the newest file of that form."""
    chosen = pick(rank_dir, fmt)
    files = sorted((p for p in rank_dir.glob(f"*.{fmt}") if p.is_file()),
                   key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    chosen_form = form_of_file(chosen, fmt)
    if form is None:
        newest = files[0] if files else chosen
        newest_form = chosen_form if newest == chosen else form_of_file(newest, fmt)
        if newest_form != chosen_form:
            raise ConvertInputError(
                f"{rank_dir}: holds both forms: {chosen.name} ({chosen_form} form, the file meta.json names) and "
                f"the newer {newest.name} ({newest_form} form)", expected="one form, or --ms-form",
                fix="pass --ms-form bucket (MindSpeed's DistributedOptimizer files) or --ms-form named (e.g. "
                    "combine_ckpt_dp_zero.py's *_dp_merged files)")
        return chosen, chosen_form
    if chosen_form == form:
        return chosen, form
    for path in files:
        if form_of_file(path, fmt) == form:
            return path, form
    raise ConvertInputError(f"{rank_dir}: no *.{fmt} file of the {form} form (--ms-form {form})",
                            expected="a bucket-form file (buffer_<b>_bucket_<k> shards)" if form == "bucket"
                            else "a file of named parameters", found=f"{chosen.name} ({chosen_form} form)",
                            fix=f"pass --ms-form {chosen_form}, or check --ms-path")


def layout_json_path(root: Path, rank: int) -> Path:
    """The layout JSON of the group whose dp rank 0 is global rank `rank` (its name always says epoch 0
    step 0: it is written when the optimizer is built, not when a checkpoint is saved)."""
    return root / f"rank_{rank}" / f"dist_opt_shard_info_rank_{rank}-0_0.json"


def find_layout_json(ms_path: Path, rank: int, given: Path | None) -> Path:
    """The JSON under --opt-shard-info (the opt_shard_info folder, or the run's output_dir holding it),
    else beside the rank folders."""
    roots = [given, given / "opt_shard_info"] if given is not None else [ms_path / "opt_shard_info"]
    for root in roots:
        if layout_json_path(root, rank).is_file():
            return layout_json_path(root, rank)
    where = given if given is not None else ms_path / "opt_shard_info"
    raise ConvertInputError(
        f"{ms_path / f'rank_{rank}'}: MindSpeed's DistributedOptimizer bucket form (buffer_<b>_bucket_<k> shards, "
        f"no named parameters), and its layout {layout_json_path(where, rank)} is not there",
        expected="opt_shard_info/rank_<r>/dist_opt_shard_info_rank_<r>-0_0.json, written by dp rank 0 of each group "
                 "into the training run's output_dir",
        fix="pass --opt-shard-info <output_dir>/opt_shard_info of the run that saved it (or combine_ckpt_dp_zero.py "
            "into a separate folder and convert that)")


def read_layout_json(path: Path) -> dict:
    """The JSON, strictly: its writer opens without O_TRUNC, so a shorter rewrite over an older JSON
    leaves the old tail behind ('Extra data'), and a layout must not be guessed from half a file."""
    text = path.read_bytes()
    try:
        info = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        stale = "Extra data" in str(e)
        raise ConvertInputError(
            f"{path}: not valid JSON ({str(e)[:120]})",
            expected="one JSON object as mindspeed_ms writes it",
            found=("a complete JSON followed by the tail of an older, longer one (its writer does not truncate: "
                   "a later run's shorter layout was written over it)") if stale else f"{len(text)} bytes",
            fix=FIX_JSON + ("; keeping the first object is no fix: which run's layout it is cannot be told"
                            if stale else "")) from None
    shape_ok = (isinstance(info, dict) and isinstance(info.get("dp_rank_list"), list) and info["dp_rank_list"]
                and isinstance(info.get("param_info"), dict) and isinstance(info.get("buffer_info"), dict))
    if not shape_ok:
        raise ConvertInputError(f"{path}: not a DistributedOptimizer layout",
                                expected="dp_rank_list, param_info and buffer_info",
                                found=", ".join(sorted(info)) if isinstance(info, dict) else type(info).__name__,
                                fix=FIX_JSON)
    return info


def same_step_file(dp0_file: Path, ms_path: Path, rank: int, fmt: str, pick: Callable[[Path, str], Path]) -> Path:
    """The file of global rank `rank` from the same save as `dp0_file` (same prefix, epoch and step in
    mindspeed_ms's file name); a dp0 file not named that way: the rank folder's usual choice, whose
    step is checked afterwards."""
    match = RANK_FILE.match(dp0_file.name)
    rank_dir = ms_path / f"rank_{rank}"
    if match is None:
        return pick(rank_dir, fmt)
    path = rank_dir / f"{match['prefix']}_rank_{rank}-{match['epoch']}_{match['step']}.{match['fmt']}"
    if not path.is_file():
        steps = sorted(f"{m['epoch']}_{m['step']}" for m in map(RANK_FILE.match, (p.name for p in rank_dir.glob("*")))
                       if m) if rank_dir.is_dir() else []
        raise ConvertInputError(
            f"{path}: missing (dp rank 0 of its group is at epoch {match['epoch']} step {match['step']}, "
            f"{dp0_file})", expected="the file of the same save in every dp rank's folder",
            found=f"saves {', '.join(steps)}" if steps else f"no file of {rank_dir}",
            fix="copy that rank's file of the same step (mindspeed_ms keeps only keep_checkpoint_max saves per rank)")
    return path


def bucket_source(dp0_file: Path, ms_path: Path, fmt: str, opt_shard_info: Path | None,
                  pick: Callable[[Path, str], Path], group_size: int | None = None) -> BucketSource:
    """The inputs of the group whose dp rank 0 saved `dp0_file` (in ms_path/rank_<r>/); `group_size` is
    the dp x cp size the rank folders are numbered with, when known."""
    rank = int(dp0_file.parent.name.split("_")[-1])
    json_path = find_layout_json(ms_path, rank, opt_shard_info)
    ranks = read_layout_json(json_path)["dp_rank_list"]
    if ranks[0] != rank:
        raise ConvertInputError(f"{json_path}: dp_rank_list {ranks}", expected=f"dp rank 0 to be rank {rank}",
                                fix=FIX_JSON)
    if group_size is not None and len(ranks) != group_size:
        raise ConvertInputError(f"{json_path}: dp_rank_list {ranks} has {len(ranks)} dp ranks",
                                expected=f"{group_size} (--ms-dp-size x --ms-cp-size, which number the rank folders)",
                                fix=f"pass --ms-dp-size {len(ranks)} (the MindSpore run's data-parallel size)")
    return BucketSource(json_path, (dp0_file, *(same_step_file(dp0_file, ms_path, r, fmt, pick) for r in ranks[1:])))


def rank_source(rank_dir: Path, ms_path: Path, fmt: str, form: str | None, opt_shard_info: Path | None,
                pick: Callable[[Path, str], Path], group_size: int | None = None) -> tuple[Path, BucketSource | None]:
    """The file the way back reads for a rank folder, and, in the bucket form, its group's inputs."""
    path, found = choose_rank_file(rank_dir, fmt, form, pick)
    return path, (None if found == "named" else bucket_source(path, ms_path, fmt, opt_shard_info, pick, group_size))


def describe_source(path: Path, bucket: BucketSource | None) -> str:
    if bucket is None:
        return str(path)
    others = ", ".join(p.parent.name + "/" + p.name for p in bucket.files[1:])
    return (f"{path} (MindSpeed's DistributedOptimizer bucket form; with {others or 'no other dp rank'}; "
            f"layout {bucket.layout_json})")


# ---------------------------------------------------------------------------------------------
# Plan: every element's place


def bucket_sizes(info: dict, path: Path) -> dict[int, list[int]]:
    """buffer -> its buckets' padded sizes, checked to be buckets 0..K-1 summing to buffer_size."""
    out = {}
    for b, buffer in info["buffer_info"].items():
        buckets = buffer.get("buckets") if isinstance(buffer, dict) else None
        try:
            sizes = [int(buckets[str(k)][0]) for k in range(len(buckets))]
        except (KeyError, TypeError, ValueError, IndexError):
            raise ConvertInputError(f"{path}: buffer {b}'s buckets {str(buckets)[:120]}",
                                    expected="buckets '0'..'K-1', each [padded, unpadded]", fix=FIX_JSON) from None
        if sum(sizes) != buffer.get("buffer_size"):
            raise ConvertInputError(f"{path}: buffer {b}'s buckets add up to {sum(sizes)} elements",
                                    expected=f"buffer_size {buffer.get('buffer_size')}", fix=FIX_JSON)
        out[int(b)] = sizes
    return out


def check_shard_sizes(sizes: Mapping[int, list[int]], dp: int, shard_numel: Mapping[tuple[int, int], int],
                      path: Path, file: Path) -> None:
    """Each bucket's shard in the files holds bucket_numel // dp elements, and no shard lacks its bucket."""
    want = {(b, k): n // dp for b, ns in sizes.items() for k, n in enumerate(ns)}
    for (b, k), n in sorted(want.items()):
        found = shard_numel.get((b, k))
        if found != n:
            raise ConvertInputError(
                f"{path}: buffer {b} bucket {k} of {sizes[b][k]} elements does not fit {file}",
                expected=f"buffer_{b}_bucket_{k} of {n} elements ({sizes[b][k]} // {dp} dp ranks)",
                found="no such tensor" if found is None else f"{found} elements", fix=FIX_JSON)
    extra = sorted(set(shard_numel) - set(want))
    if extra:
        raise ConvertInputError(f"{file}: buffer_{extra[0][0]}_bucket_{extra[0][1]} has no place in {path}",
                                expected=f"the {len(want)} buckets of the layout", found=f"{len(shard_numel)}",
                                fix=FIX_JSON)


def place_param(name: str, entry: dict, sizes: Mapping[int, list[int]], dp: int, path: Path) -> tuple[ParamPlace, int]:
    """A parameter's segments, and how many of its elements lie in no shard (the bucket's tail beyond
    dp * (bucket_numel // dp))."""
    try:
        b, k, start, end = (int(v) for v in entry["range_map"])
        shape = tuple(int(d) for d in entry["shape"])
        bucket_numel = sizes[b][k]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ConvertInputError(f"{path}: param_info of {name}: {str(entry)[:160]}",
                                expected="range_map [buffer, bucket, start, end] of a listed bucket, and shape",
                                fix=FIX_JSON) from None
    bucket_start = sum(sizes[b][:k])
    if not bucket_start <= start <= end <= bucket_start + bucket_numel or end - start != math.prod(shape):
        raise ConvertInputError(f"{path}: {name} at [{start}, {end}) with shape {list(shape)}",
                                expected=f"{math.prod(shape)} elements inside bucket {k} of buffer {b} "
                                         f"[{bucket_start}, {bucket_start + bucket_numel})", fix=FIX_JSON)
    shard = bucket_numel // dp
    segments = []
    for d in range(dp):
        lo, hi = max(start, bucket_start + d * shard), min(end, bucket_start + (d + 1) * shard)
        if lo < hi:
            segments.append(Segment(start=lo - start, dp=d, offset=lo - bucket_start - d * shard, length=hi - lo))
    lost = end - start - sum(s.length for s in segments)
    return ParamPlace(name, shape, str(entry.get("dtype", "float32")), b, k, tuple(segments)), lost


def plan_layout(info: dict, path: Path, shard_numel: Mapping[tuple[int, int], int], file: Path) -> BucketLayout:
    """Every parameter's segments, from the layout JSON `info` (at `path`) and the shard sizes found in
    the files' headers (`file` names the dp-rank-0 file in messages). Refuses a layout that does not
    fit the shards, and parameters with elements in no shard."""
    dp_ranks = tuple(int(r) for r in info["dp_rank_list"])
    if info.get("zero3_params"):
        raise ConvertInputError(f"{path}: zero3_params {', '.join(list(info['zero3_params'])[:3])}",
                                expected="every parameter in the buckets",
                                found="zero3 parameters, which the bucket form does not save",
                                fix="convert a checkpoint saved without use_zero3")
    sizes = bucket_sizes(info, path)
    check_shard_sizes(sizes, len(dp_ranks), shard_numel, path, file)
    places, lost = [], []
    for name, entry in info["param_info"].items():
        place, missing = place_param(name, entry, sizes, len(dp_ranks), path)
        places.append(place)
        if missing:
            lost.append((name, missing, place))
    if lost:
        name, n, place = lost[0]
        raise ConvertInputError(
            f"{file}: {n} element(s) of {name} are in no shard ({len(lost)} parameter(s) affected)",
            expected=f"every element saved; bucket {place.bucket} of buffer {place.buffer} has "
                     f"{sizes[place.buffer][place.bucket]} elements, not divisible by {len(dp_ranks)} dp ranks",
            found="its tail beyond the last shard, which mindspeed_ms (enable_mem_align=False) never optimized nor "
                  "saved",
            fix="these values are lost in this form; resume training in MindSpore with enable_mem_align=True (or "
                "from the name-keyed checkpoint it started from) and save again")
    return BucketLayout(path, dp_ranks, tuple(sorted(shard_numel.items())), tuple(places))


# ---------------------------------------------------------------------------------------------
# Read: a MindSporeFile-like view of one group


def shard_sizes(ms: MindSporeFile) -> dict[tuple[int, int], int]:
    """(buffer, bucket) -> elements of this file's shard; the three states' shards must agree and be fp32."""
    out: dict[tuple[int, int], int] = {}
    for name in ms.names():
        match = BUCKET_KEY.match(name)
        if not match:
            continue
        info = ms.info(name)
        key, numel = (int(match[2]), int(match[3])), math.prod(info.shape)
        if info.dtype != "float32" or len(info.shape) != 1 or out.setdefault(key, numel) != numel:
            raise ConvertInputError(f"{ms.path}: {name} is {info.dtype} {list(info.shape)}",
                                    expected=f"a float32 1-D shard of {out[key]} elements like its bucket's others",
                                    fix="re-copy the file (damaged?)")
    for b, k in out:
        missing = [p for p in STATE_PREFIXES if f"{p}buffer_{b}_bucket_{k}" not in ms]
        if missing:
            raise ConvertInputError(f"{ms.path}: no {missing[0]}buffer_{b}_bucket_{k}",
                                    expected="the param, exp_avg and exp_avg_sq shards of every bucket",
                                    fix="re-copy the file (damaged?)")
    return out


def save_of(ms: MindSporeFile) -> tuple:
    values = []
    for name in ("epoch_num", "step_num"):
        values.append(ms.read(name).reshape(()).item() if name in ms and ms.info(name).nbytes else None)
    return tuple(values)


def check_one_save(files: Sequence[MindSporeFile], dp_ranks: Sequence[int]) -> None:
    """The dp ranks' files come from one save: the same epoch_num and step_num."""
    saves = [save_of(ms) for ms in files]
    if len(set(saves)) != 1:
        shown = ", ".join(f"rank {r} epoch {e} step {s} ({ms.path.name})"
                          for r, ms, (e, s) in zip(dp_ranks, files, saves))
        raise ConvertInputError(f"the dp ranks of {files[0].path.parent.name}'s group hold different saves: {shown}",
                                expected="one epoch_num and step_num in every dp rank's file",
                                fix="copy every dp rank's file of the same save")


class BucketRankFile:
    """One (tp, pp) group read through its dp ranks' bucket shards, answering like a MindSporeFile of
    named tensors: `<param>`, `exp_avg.<param>`, `exp_avg_sq.<param>` (fp32, tp-local shape) for every
    parameter of the layout, and the dp-rank-0 file's other tensors (scalars, frozen parameters) as they
    are. A parameter inside one shard is a view of the mapping; one straddling shards is gathered into a
    tensor of its own size."""

    def __init__(self, layout: BucketLayout, files: Sequence[MindSporeFile]):
        self.layout = layout
        self.path = files[0].path
        self.fmt = files[0].fmt
        self._files = list(files)
        self._places = {place.name: place for place in layout.params}
        others = [n for n in files[0].names() if not BUCKET_KEY.match(n)]
        self._names = [p + place.name for place in layout.params for p in STATE_PREFIXES] + others
        self._known = set(self._names)

    def _place(self, name: str) -> tuple[str, ParamPlace | None]:
        for prefix in STATE_PREFIXES[:0:-1]:
            if name.startswith(prefix) and name[len(prefix):] in self._places:
                return prefix, self._places[name[len(prefix):]]
        return "", self._places.get(name)

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> StoredTensor:
        _, place = self._place(name)
        return StoredTensor(name, place.shape, "float32") if place is not None else self._files[0].info(name)

    def read(self, name: str) -> torch.Tensor:
        prefix, place = self._place(name)
        if place is None:
            return self._files[0].read(name)
        key = place.key(prefix)
        pieces = [self._files[s.dp].read_elements(key, s.offset, s.length) for s in place.segments]
        if len(pieces) == 1:
            return pieces[0].reshape(place.shape)
        # numpy's copy is one thread front to back, so the kernel's readahead serves the mapped pages; a
        # torch copy this large splits over threads that fault pages in at several places at once (2x slower)
        out = np.empty(math.prod(place.shape), dtype=np.float32)
        for segment, piece in zip(place.segments, pieces):
            out[segment.start:segment.start + segment.length] = piece.numpy()
        return torch.from_numpy(out).reshape(place.shape)

    def read_row(self, name: str, row: int) -> torch.Tensor:
        return self.read(name)[row]

    def strings(self) -> dict[str, str]:
        return self._files[0].strings()

    def metadata(self) -> dict[str, str]:
        return self._files[0].metadata()

    def check_crc(self) -> bool:
        """The CRC-32 each dp rank's file stored when saved with crc_check=True (as MindSporeFile.check_crc);
        True when every file had one."""
        return all([ms.check_crc() for ms in self._files])

    def describe_contents(self) -> str:
        return (f"MindSpeed's DistributedOptimizer bucket form ({len(self.layout.params)} parameters in the buckets "
                f"of {self.layout.json_path}; experts, zero3 and frozen parameters outside its grad buffers are not "
                "saved in this form)")

    def __contains__(self, name) -> bool:
        return name in self._known

    def __len__(self) -> int:
        return len(self._names)

    def close(self) -> None:
        for ms in self._files:
            ms.close()

    def __enter__(self) -> "BucketRankFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BucketRankFile({str(self.path)!r}, dp ranks {list(self.layout.dp_ranks)})"


def open_bucket_form(source: BucketSource, fmt: str) -> BucketRankFile:
    """Open every dp rank's file of the group (mapped, headers indexed), check they are one save and fit
    the layout JSON, and return the group as named tensors."""
    info = read_layout_json(source.layout_json)
    files: list[MindSporeFile] = []
    try:
        for path in source.files:
            files.append(open_mindspore_file(path, fmt))
        dp_ranks = [int(r) for r in info["dp_rank_list"]]
        if len(dp_ranks) != len(files):
            raise ConvertInputError(f"{source.layout_json}: dp_rank_list {dp_ranks}",
                                    expected=f"{len(files)} dp ranks", fix=FIX_JSON)
        check_one_save(files, dp_ranks)
        sizes = [shard_sizes(ms) for ms in files]
        for ms, found in zip(files[1:], sizes[1:]):
            if found != sizes[0]:
                raise ConvertInputError(f"{ms.path}: its bucket shards differ in size from {files[0].path}'s",
                                        expected="the same buckets in every dp rank of a group",
                                        fix="copy every dp rank's file of the same save")
        layout = plan_layout(info, source.layout_json, sizes[0], files[0].path)
    except BaseException:
        for ms in files:
            ms.close()
        raise
    return BucketRankFile(layout, files)


def open_rank_source(path: Path, fmt: str, bucket: BucketSource | None = None):
    """What the way back reads a rank from: the named file itself, or the bucket form's group."""
    return open_mindspore_file(path, fmt) if bucket is None else open_bucket_form(bucket, fmt)
