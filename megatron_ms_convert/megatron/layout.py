"""Where each parameter lives inside the distributed optimizer's buckets: the layout knowledge.

A *layout* is one grad buffer of one model chunk: its parameters in buffer order, each with its span
in the whole buffer and its bucket. Layouts come from the param_map JSON
files the patched trainer writes, or are inferred from the checkpoint itself (the parameter order of
model_optim_rng.pt plus the bucket sizes recorded in distrib_optim.pt). Either way they are checked
against distrib_optim.pt before a byte is written. Reading the map files is the only I/O here.

    >>> counts = [BucketCounts(0, ("torch.float32", "torch.float32"), (4,), (3,))]
    >>> [layout] = infer_layouts([[("w", (3,), "torch.float32")]], counts, grad_in_fp32=False, wrapped=False)
    >>> layout.params[0].start, layout.params[0].end, layout.params[0].bucket
    (0, 3, 0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ConvertInputError

PARAM_MAP_FILE = re.compile(r"^param_map_buffer(\d+)_dp(\d+)tp(\d+)pp(\d+)vpp(\d+)\.json$")
# MoE: the expert-parallel buffers of expert-parallel rank ep; dp is the rank in the expert buffers'
# own data-parallel group (data-parallel modulo expert-parallel)
EXPERT_PARAM_MAP_FILE = re.compile(r"^param_map_expert_buffer(\d+)_ep(\d+)dp(\d+)tp(\d+)pp(\d+)vpp(\d+)\.json$")
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "convert_pt2ckpt.param_map_meta"

# Legacy GPT saves the last stage's copy of the tied embedding under this key, while DDP (and so the
# param_map) names it `word_embeddings.weight`.
_HEAD_COPY_DDP = "word_embeddings.weight"
_HEAD_COPY_STATE = "word_embeddings_for_head.weight"


@dataclass(frozen=True)
class ParamSpan:
    """One parameter inside a grad buffer: [start, end) in whole-buffer coordinates, in `bucket`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    bucket: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketBounds:
    start: int
    end: int
    numel_unpadded: int


@dataclass(frozen=True)
class BufferSidecar:
    """The extra facts our patch records per buffer (`*.meta.json`); absent for the documented patch."""

    path: str
    param_dtype: str
    grad_dtype: str
    data_parallel_size: int
    numel: int
    buckets: tuple[BucketBounds, ...]


@dataclass(frozen=True)
class BufferLayout:
    """The parameters of one grad buffer (`buffer_index` inside model chunk `chunk`), in buffer order."""

    chunk: int
    buffer_index: int
    params: tuple[ParamSpan, ...]
    source: str
    sidecar: BufferSidecar | None = None


@dataclass(frozen=True)
class BucketCounts:
    """What distrib_optim.pt says about one grad buffer: its dtype key and per-bucket sizes."""

    gbuf_idx: int
    dtype_key: tuple[str, str]
    padded: tuple[int, ...]
    unpadded: tuple[int, ...]

    def bucket_start(self, bucket: int) -> int:
        """Buckets are laid back to back at their padded sizes, so bucket b starts at sum(padded[:b])."""
        return sum(self.padded[:bucket])


# ---------------------------------------------------------------------------------------------
# Names


def state_key_for(ddp_name: str) -> str:
    """The model_optim_rng.pt key of a DDP parameter name (drop Float16Module's `module.`)."""
    key = ddp_name[len("module."):] if ddp_name.startswith("module.") else ddp_name
    return _HEAD_COPY_STATE if key == _HEAD_COPY_DDP else key


def ddp_name_for(state_key: str, wrapped: bool) -> str:
    """The DDP name of a state-dict key; `wrapped` is True for fp16/bf16 runs (Float16Module)."""
    name = _HEAD_COPY_DDP if state_key == _HEAD_COPY_STATE else state_key
    return f"module.{name}" if wrapped else name


def param_map_file_name(buffer_index: int, dp: int, tp: int, pp: int, chunk: int) -> str:
    return f"param_map_buffer{buffer_index}_dp{dp}tp{tp}pp{pp}vpp{chunk}.json"


def expert_param_map_file_name(buffer_index: int, ep: int, dp: int, tp: int, pp: int, chunk: int) -> str:
    return f"param_map_expert_buffer{buffer_index}_ep{ep}dp{dp}tp{tp}pp{pp}vpp{chunk}.json"


# ---------------------------------------------------------------------------------------------
# Reading param_map files


def list_param_map_files(param_map_dir: Path) -> dict[tuple[int, int, int, int], dict[int, Path]]:
    """(tp, pp, chunk, buffer) -> {dp rank: file} for every param_map JSON in the folder."""
    param_map_dir = Path(param_map_dir)
    if not param_map_dir.is_dir():
        raise ConvertInputError(f"--param-map-path {param_map_dir}: no such folder",
                                fix="pass the param_map folder written by the patched trainer, or omit "
                                    "--param-map-path to infer the layout from the checkpoint")
    files: dict[tuple[int, int, int, int], dict[int, Path]] = {}
    for path in sorted(param_map_dir.iterdir()):
        match = PARAM_MAP_FILE.match(path.name)
        if match:
            buffer_index, dp, tp, pp, chunk = map(int, match.groups())
            files.setdefault((tp, pp, chunk, buffer_index), {})[dp] = path
    if not files:
        raise ConvertInputError(f"--param-map-path {param_map_dir}: no param_map files in it",
                                expected="param_map_buffer{B}_dp{dp}tp{tp}pp{pp}vpp{v}.json files",
                                found=f"{sum(1 for _ in param_map_dir.iterdir())} other entries",
                                fix="point --param-map-path at <save>/param_map, or omit it to infer the layout")
    return files


def list_expert_param_map_files(param_map_dir: Path) -> dict[int, dict[tuple[int, int, int, int], dict[int, Path]]]:
    """ep rank -> (tp, pp, chunk, buffer) -> {expert dp rank: file} for every expert param_map JSON in
    the folder; empty when there are none (the documented patch records no expert buffers)."""
    files: dict[int, dict[tuple[int, int, int, int], dict[int, Path]]] = {}
    for path in sorted(Path(param_map_dir).iterdir()):
        match = EXPERT_PARAM_MAP_FILE.match(path.name)
        if match:
            buffer_index, ep, dp, tp, pp, chunk = map(int, match.groups())
            files.setdefault(ep, {}).setdefault((tp, pp, chunk, buffer_index), {})[dp] = path
    return files


def read_rank_layouts(files: dict[tuple[int, int, int, int], dict[int, Path]], tp: int, pp: int,
                      num_chunks: int, param_map_dir: Path) -> list[BufferLayout]:
    """The layouts of one (tp, pp) rank, ordered by (chunk, buffer) as distrib_optim.pt chains them.

    Every model chunk must have its files, no chunk beyond the last may exist (the documented patch
    numbers chunks by counting files already present, so a reused --save leaves such stale ones), and
    the copies written by each data-parallel rank must agree."""
    mine = {(chunk, b): by_dp for (t, p, chunk, b), by_dp in files.items() if (t, p) == (tp, pp)}
    chunks = sorted({chunk for chunk, _ in mine})
    expected = list(range(num_chunks))
    if chunks != expected:
        raise ConvertInputError(
            f"--param-map-path {param_map_dir}: param_map files for tp{tp} pp{pp} cover model chunks {chunks}",
            expected=f"chunks {expected} (vpp files {', '.join(f'vpp{c}' for c in expected)})",
            found=f"chunks {chunks}",
            fix="re-record the param_map in a clean --save folder (stale files from an earlier run?), "
                "check --vpp-size, or omit --param-map-path to infer the layout",
        )
    layouts = []
    for chunk in expected:
        buffers = sorted(b for c, b in mine if c == chunk)
        if buffers != list(range(len(buffers))):
            raise ConvertInputError(f"--param-map-path {param_map_dir}: tp{tp} pp{pp} vpp{chunk} buffers {buffers}",
                                    expected="buffers numbered 0, 1, ...", found=f"{buffers}",
                                    fix="restore the missing param_map_buffer files")
        for b in buffers:
            layouts.append(_read_agreeing_copies(mine[(chunk, b)], chunk, b))
    return layouts


def _read_agreeing_copies(by_dp: dict[int, Path], chunk: int, buffer_index: int) -> BufferLayout:
    first_dp = min(by_dp)
    path = by_dp[first_dp]
    text = read_map_text(path)
    for dp, other in sorted(by_dp.items()):
        if dp != first_dp and _json_of(read_map_text(other), other) != _json_of(text, path):
            raise ConvertInputError(f"{other}: differs from {path.name}",
                                    expected="identical param_map files for every data-parallel rank",
                                    found="two different layouts (files from two runs?)",
                                    fix="re-record the param_map in a clean --save folder")
    sidecar = _agreeing_sidecar(by_dp)
    return parse_param_map(text, str(path), chunk, buffer_index, sidecar)


def _agreeing_sidecar(by_dp: dict[int, Path]) -> BufferSidecar | None:
    """The first dp rank's sidecar, once every dp rank's copy has been read and found to agree with
    it (they differ only in their dp_rank): pt_meta/ copies all of them, so none may pass unread."""
    paths = {dp: path.with_name(path.name[: -len(".json")] + SIDECAR_SUFFIX) for dp, path in sorted(by_dp.items())}
    sidecars = {dp: read_sidecar(p) for dp, p in paths.items() if p.is_file()}
    if not sidecars:
        return None
    first_dp = min(sidecars)
    first = sidecars[first_dp]
    for dp, sidecar in sidecars.items():
        if dataclasses.replace(sidecar, path=first.path) != first:
            raise ConvertInputError(f"{paths[dp]}: differs from {paths[first_dp].name}",
                                    expected="the same buffer facts in every data-parallel rank's sidecar",
                                    found="two different ones (files from two runs, or damaged?)",
                                    fix="re-record the param_map, or delete the .meta.json files")
    return first


def read_map_text(path: Path) -> str:
    """A param_map file's text; bytes that are not UTF-8 (a damaged copy) are bad input, not a crash."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConvertInputError(f"{path}: not valid JSON (not UTF-8 text at byte {err.start})",
                                fix="re-record the param_map") from None


def _json_of(text: str, source) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConvertInputError(f"{source}: not valid JSON ({err})", fix="re-record the param_map") from None


def parse_param_map(text: str, source: str, chunk: int, buffer_index: int,
                    sidecar: BufferSidecar | None = None) -> BufferLayout:
    """One param_map JSON: `name -> [dtype, shape, start, end, bucket]`, in buffer order."""
    raw = _json_of(text, source)
    if not isinstance(raw, dict) or not raw:
        raise ConvertInputError(f"{source}: expected a non-empty JSON object", found=type(raw).__name__,
                                fix="re-record the param_map")
    params = []
    for name, value in raw.items():
        ok = (isinstance(value, list) and len(value) == 5 and isinstance(value[0], str)
              and isinstance(value[1], list) and all(isinstance(v, int) for v in value[1])
              and all(isinstance(v, int) for v in value[2:]))
        if not ok:
            raise ConvertInputError(f"{source}: entry {name!r}",
                                    expected='["torch.bfloat16", [shape...], start, end, bucket_id]',
                                    found=json.dumps(value)[:120], fix="re-record the param_map")
        dtype, shape, start, end, bucket = value
        params.append(ParamSpan(name, dtype, tuple(shape), start, end, bucket))
    return BufferLayout(chunk, buffer_index, tuple(params), source, sidecar)


def read_sidecar(path: Path) -> BufferSidecar:
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != SIDECAR_FORMAT or raw.get("version") != 1:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        _check_sidecar_fields(raw, Path(path).name)
        return BufferSidecar(
            path=str(path), param_dtype=raw["param_dtype"], grad_dtype=raw["grad_dtype"],
            data_parallel_size=int(raw["data_parallel_size"]), numel=int(raw["numel"]),
            buckets=tuple(BucketBounds(int(b["start"]), int(b["end"]), int(b["numel_unpadded"]))
                          for b in raw["buckets"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConvertInputError(f"{path}: unreadable param_map sidecar ({err})",
                                expected=f"a {SIDECAR_FORMAT} version 1 JSON object",
                                fix="re-record the param_map, or delete the .meta.json files") from None


SIDECAR_KEYS = {"format", "version", "param_dtype", "grad_dtype", "data_parallel_size", "bucket_size", "numel",
                "buckets", "model_chunk", "buffer_index", "tp_rank", "pp_rank", "dp_rank"}
SIDECAR_EXPERT_KEYS = {"expert_parallel", "ep_rank"}


def _check_sidecar_fields(raw: dict, name: str) -> None:
    """Every field the patch writes, and no other; the ranks it records are the ones in its file name.
    pt_meta/ keeps a copy of the file, so a field the conversion does not use must still be sound."""
    json_name = name[: -len(SIDECAR_SUFFIX)] + ".json"
    dense, expert = PARAM_MAP_FILE.match(json_name), EXPERT_PARAM_MAP_FILE.match(json_name)
    keys = SIDECAR_KEYS | (SIDECAR_EXPERT_KEYS if expert else set())
    if set(raw) != keys:
        raise ValueError(f"fields {sorted(set(raw) ^ keys)} differ from the patch's")
    if expert:
        named = dict(zip(("buffer_index", "ep_rank", "dp_rank", "tp_rank", "pp_rank", "model_chunk"),
                         map(int, expert.groups())), expert_parallel=True)
    elif dense:
        named = dict(zip(("buffer_index", "dp_rank", "tp_rank", "pp_rank", "model_chunk"), map(int, dense.groups())))
    else:
        raise ValueError("a file name not of a param_map sidecar")
    recorded = {key: raw[key] for key in named}
    if recorded != named or any(type(v) is not type(named[k]) for k, v in recorded.items()):
        raise ValueError(f"ranks {recorded} where the file name says {named}")
    if raw["bucket_size"] is not None and type(raw["bucket_size"]) is not int:
        raise ValueError(f"bucket_size {raw['bucket_size']!r}")


def param_map_json(layout: BufferLayout) -> str:
    """The documented JSON of a layout, as the patched trainer writes it."""
    return json.dumps({p.name: [p.dtype, list(p.shape), p.start, p.end, p.bucket] for p in layout.params})


# ---------------------------------------------------------------------------------------------
# Checking a layout against the checkpoint


def check_layouts(layouts: Sequence[BufferLayout], counts: Sequence[BucketCounts],
                  chunk_tensors: Sequence[dict[str, tuple[tuple[int, ...], str]]], distrib_file: str) -> None:
    """Refuse a layout that does not fit the checkpoint, naming the offending file.

    chunk_tensors[c] maps each state-dict key of chunk c to (shape, dtype). The checks: one layout per
    grad buffer with the buffer's dtype, bucket ids that exist, every span inside its bucket's unpadded
    part, spans that do not overlap and fill each bucket exactly (per_bucket_numel_unpadded), and
    names present in model_optim_rng.pt with the same shape and dtype."""
    if len(layouts) != len(counts):
        where = layouts[0].source if layouts else "the param_map"
        raise ConvertInputError(f"{where}: the param_map has {len(layouts)} grad buffers for this rank",
                                expected=f"{len(counts)} (as in {distrib_file})", found=str(len(layouts)),
                                fix="use the param_map of this run (stale or foreign map?), or omit --param-map-path")
    for layout, count in zip(layouts, counts):
        _check_one_layout(layout, count, chunk_tensors[layout.chunk], distrib_file)


def _check_one_layout(layout: BufferLayout, count: BucketCounts,
                      tensors: dict[str, tuple[tuple[int, ...], str]], distrib_file: str) -> None:
    src = layout.source
    fix = "use the param_map recorded by this training run (stale map from a reused --save?), or omit --param-map-path"

    def fail(what: str, expected: str, found: str):
        raise ConvertInputError(f"{src}: {what}", expected=expected, found=found, fix=fix)

    nbuckets = len(count.padded)
    filled = [0] * nbuckets
    for span in layout.params:
        if span.dtype != count.dtype_key[0]:
            fail(f"{span.name} has dtype {span.dtype}", f"{count.dtype_key[0]} (grad buffer {count.gbuf_idx} "
                 f"of {distrib_file})", span.dtype)
        if not 0 <= span.bucket < nbuckets:
            fail(f"{span.name} is in bucket {span.bucket}", f"a bucket in 0..{nbuckets - 1}", str(span.bucket))
        lo = count.bucket_start(span.bucket)
        hi = lo + count.unpadded[span.bucket]
        if span.numel != math.prod(span.shape):
            fail(f"{span.name} spans [{span.start}, {span.end})", f"{math.prod(span.shape)} elements for shape "
                 f"{list(span.shape)}", f"{span.numel}")
        if span.start < lo or span.end > hi:
            fail(f"{span.name} spans [{span.start}, {span.end})", f"inside bucket {span.bucket} = [{lo}, {hi}) "
                 f"of {distrib_file}", f"{max(lo - span.start, span.end - hi)} elements outside it")
        filled[span.bucket] += span.numel
        key = state_key_for(span.name)
        if key not in tensors:
            fail(f"{span.name} is not in model chunk {layout.chunk}", "a parameter of model_optim_rng.pt",
                 "no such parameter (map of another model?)")
        shape, dtype = tensors[key]
        if tuple(shape) != span.shape or dtype != span.dtype:
            fail(f"{span.name} is {list(span.shape)} {span.dtype}",
                 f"{list(shape)} {dtype} as in model_optim_rng.pt", f"{list(span.shape)} {span.dtype}")
    ordered = sorted(layout.params, key=lambda s: s.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            fail(f"{before.name} and {after.name} overlap", "disjoint spans",
                 f"[{before.start}, {before.end}) and [{after.start}, {after.end})")
    for bucket, (got, want) in enumerate(zip(filled, count.unpadded)):
        if got != want:
            fail(f"bucket {bucket} holds {got} elements of parameters",
                 f"{want} (per_bucket_numel_unpadded in {distrib_file})", f"{got} ({got - want:+d})")
    if layout.sidecar is not None:
        _check_sidecar(layout.sidecar, count, distrib_file)


def _check_sidecar(sidecar: BufferSidecar, count: BucketCounts, distrib_file: str) -> None:
    recorded = tuple((b.end - b.start, b.numel_unpadded) for b in sidecar.buckets)
    actual = tuple(zip(count.padded, count.unpadded))
    if recorded != actual or (sidecar.param_dtype, sidecar.grad_dtype) != count.dtype_key:
        raise ConvertInputError(
            f"{sidecar.path}: bucket layout differs from {distrib_file}",
            expected=f"{count.dtype_key} buckets (padded, unpadded) {list(actual)}",
            found=f"{(sidecar.param_dtype, sidecar.grad_dtype)} {list(recorded)}",
            fix="use the param_map recorded by this training run, or omit --param-map-path",
        )
    if any(size % sidecar.data_parallel_size for size in count.padded):
        raise ConvertInputError(f"{sidecar.path}: data_parallel_size {sidecar.data_parallel_size}",
                                expected="a divisor of every padded bucket size", found=f"{list(count.padded)}",
                                fix="use the param_map recorded by this training run")


# ---------------------------------------------------------------------------------------------
# Inferring a layout from the checkpoint


def infer_layouts(chunk_params: Sequence[Sequence[tuple[str, tuple[int, ...], str]]],
                  counts: Sequence[BucketCounts], *, grad_in_fp32: bool, wrapped: bool,
                  source: str = "inferred") -> list[BufferLayout]:
    """Rebuild every grad buffer's layout from the parameters (state-dict key, shape, dtype) of each
    model chunk in named_parameters order and the bucket sizes distrib_optim.pt recorded.

    Megatron groups parameters into one buffer per (param dtype, grad dtype) in order of first
    appearance, packs each buffer in REVERSE parameter order, and pads every bucket to a multiple of
    the data-parallel size. Bucket boundaries are read off per_bucket_numel_unpadded instead of being
    re-derived from bucket_size, which forks change. Raises ConvertInputError when the parameters do
    not fill the recorded buckets exactly (for example a frozen parameter that has no place in them).
    """
    layouts: list[BufferLayout] = []
    gbuf = 0
    for chunk, params in enumerate(chunk_params):
        for buffer_index, (dtype_key, members) in enumerate(_group_by_buffer(params, grad_in_fp32).items()):
            if gbuf >= len(counts):
                raise ConvertInputError(
                    f"{source}: model chunk {chunk} needs grad buffer {gbuf} ({dtype_key})",
                    expected=f"at most {len(counts)} buffers as recorded in distrib_optim.pt",
                    found="more parameter dtypes than buffers",
                    fix="pass --param-map-path with the map recorded by the patched trainer")
            count = counts[gbuf]
            if count.dtype_key != dtype_key:
                raise ConvertInputError(
                    f"{source}: grad buffer {gbuf} (chunk {chunk}, buffer {buffer_index})",
                    expected=f"dtype key {count.dtype_key} as recorded in distrib_optim.pt",
                    found=f"parameters of {dtype_key}",
                    fix="pass --param-map-path with the map recorded by the patched trainer")
            spans = _pack_buffer(list(reversed(members)), count, chunk, buffer_index, wrapped, source)
            layouts.append(BufferLayout(chunk, buffer_index, tuple(spans), source))
            gbuf += 1
    if gbuf != len(counts):
        raise ConvertInputError(f"{source}: the model has {gbuf} grad buffers",
                                expected=f"{len(counts)} as recorded in distrib_optim.pt", found=str(gbuf),
                                fix="pass --param-map-path with the map recorded by the patched trainer")
    return layouts


def _group_by_buffer(params: Iterable[tuple[str, tuple[int, ...], str]], grad_in_fp32: bool):
    groups: dict[tuple[str, str], list[tuple[str, tuple[int, ...], str]]] = {}
    for key, shape, dtype in params:
        grad_dtype = "torch.float32" if grad_in_fp32 else dtype
        groups.setdefault((dtype, grad_dtype), []).append((key, shape, dtype))
    return groups


def _pack_buffer(members, count: BucketCounts, chunk: int, buffer_index: int, wrapped: bool,
                 source: str) -> list[ParamSpan]:
    spans = []
    bucket, start = 0, 0
    for key, shape, dtype in members:
        numel = math.prod(shape)
        if bucket >= len(count.padded):
            raise ConvertInputError(
                f"{source}: chunk {chunk} buffer {buffer_index}: parameter {key} does not fit",
                expected=f"{len(count.padded)} buckets holding {sum(count.unpadded)} elements",
                found=f"{numel} more elements after the last bucket is full",
                fix="a frozen or extra parameter? pass --param-map-path with the map recorded by the patched trainer")
        bucket_start = count.bucket_start(bucket)
        end = start + numel
        room = bucket_start + count.unpadded[bucket]
        if end > room:
            raise ConvertInputError(
                f"{source}: chunk {chunk} buffer {buffer_index} bucket {bucket}: parameter {key} overflows it",
                expected=f"{count.unpadded[bucket]} elements of parameters in the bucket",
                found=f"{end - bucket_start} ({end - room:+d} elements)",
                fix="a frozen parameter, or another bucketing rule? pass --param-map-path with the map "
                    "recorded by the patched trainer")
        spans.append(ParamSpan(ddp_name_for(key, wrapped), dtype, tuple(shape), start, end, bucket))
        start = end
        if end == room:
            bucket += 1
            start = count.bucket_start(bucket)
    if bucket != len(count.padded):
        short = (count.bucket_start(bucket) + count.unpadded[bucket] - start) if bucket < len(count.padded) else 0
        raise ConvertInputError(
            f"{source}: chunk {chunk} buffer {buffer_index} bucket {bucket}: parameters run out",
            expected=f"{len(count.padded)} full buckets as recorded in distrib_optim.pt",
            found=f"{short} elements of bucket {bucket} unaccounted for",
            fix="pass --param-map-path with the map recorded by the patched trainer")
    return spans


def layout_differences(given: Sequence[BufferLayout], inferred: Sequence[BufferLayout]) -> list[str]:
    """Human-readable differences between a param_map and the inferred layout (empty when equal)."""
    out = []
    for a, b in zip(given, inferred):
        mine = {p.name: p for p in a.params}
        theirs = {p.name: p for p in b.params}
        for name in sorted(mine.keys() | theirs.keys()):
            pa, pb = mine.get(name), theirs.get(name)
            if pa != pb:
                out.append(f"{a.source}: {name}: map {_span_text(pa)} vs checkpoint {_span_text(pb)}")
    if len(given) != len(inferred):
        out.append(f"{len(given)} buffers in the map vs {len(inferred)} inferred")
    return out


def _span_text(span: ParamSpan | None) -> str:
    if span is None:
        return "absent"
    return f"[{span.start}, {span.end}) bucket {span.bucket} {list(span.shape)} {span.dtype}"
