"""Mutation test: damaged input bytes, in both directions, never convert silently.

A small checkpoint is converted to MindSpore (.ckpt with a `crc_check=True` trailer, and .safetensors
with `crc_num`) and back; then, with a fixed seed, a few hundred mutations are applied one at a time
to every input file kind: byte flips in a .pt's pickle, zip local headers, central directory and
tensor records; in param_map JSON and its sidecar; in a .ckpt's protobuf headers, tensor bytes and
CRC trailer; in a .safetensors' header length, JSON header and data; and truncations of each. Every
run (in this process, --multiprocess-off) must end either in a clean error (exit 1 or 2, one-line
ERROR messages that are not a wrapped Python exception, no traceback, no temporary or rank output
left at a final path) or exit 0 with outputs identical to the unmutated run's. Never a silently
different output, a traceback or a hang. The counts are printed (pytest -s) and asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
import signal
import struct
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_ms_convert.ckpt2pt import main as ckpt2pt_main
from megatron_ms_convert.pt2ckpt import main as pt2ckpt_main
from tests.megatron_fixture import FixtureSpec, write_fixture

SEED = 18
SPEC = FixtureSpec(dp=2, num_layers=2, hidden=16, vocab=50, bucket_size=300, param_map="with_sidecar")
RUN_TIMEOUT_S = 30
CRASH = re.compile(r"(ERROR |failed to convert '[^']*': )[A-Z]\w*(Error|Exception|Interrupt)\b")
TORCH_SERIALIZATION_ID = ".data/serialization_id"  # random per torch.save, carries no content


class Hang(Exception):
    pass


@dataclass(frozen=True)
class Mutation:
    file: Path
    kind: str  # which region: 'pickle', 'local header', 'central directory', 'tensor data', 'json', ...
    offset: int  # byte flipped, or the length kept by a truncation
    xor: int  # 0: truncate at offset

    def apply(self, original: bytes) -> bytes:
        if not self.xor:
            return original[:self.offset]
        damaged = bytearray(original)
        damaged[self.offset] ^= self.xor
        return bytes(damaged)


def in_process(main, args) -> tuple[int | str, str]:
    """(exit code, or 'traceback'/'hang', and the log) of one CLI run in this process."""
    log = io.StringIO()

    def alarm(*_):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(RUN_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            code = main([str(a) for a in args])
    except Hang:
        code = "hang"
    except SystemExit as err:  # argparse's usage errors
        code = err.code
    except BaseException as err:  # noqa: B902 - anything escaping main() is a traceback for the user
        code = f"traceback {type(err).__name__}: {err}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, log.getvalue()


# ---------------------------------------------------------------------------------------------
# Outputs and their comparison


def digest(path: Path) -> object:
    """A file's content; a .pt by its records' names and CRCs without torch's random serialization id."""
    data = path.read_bytes()
    if path.suffix == ".pt":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return sorted((i.filename.split("/", 1)[-1], i.CRC, zlib.crc32(archive.read(i)))
                              for i in archive.infolist() if not i.filename.endswith(TORCH_SERIALIZATION_ID))
        except zipfile.BadZipFile:
            return data
    return data


def outputs(root: Path) -> dict[str, object]:
    """Every file a run left, but the manifests and lock (they record paths and file times)."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("manifest") and "lock" not in p.name}


def is_rank_output(name: str) -> bool:
    return name.startswith("rank_") or "/mp_rank_" in name or name.startswith("pt_meta/args_")


# ---------------------------------------------------------------------------------------------
# Where to mutate


def zip_regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of a torch.save zip by what they hold."""
    regions: dict[str, list[tuple[int, int]]] = {"pickle": [], "local header": [], "tensor data": [],
                                                 "small record": []}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        start_dir = archive.start_dir
    for info in infos:
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        begin = info.header_offset + 30 + name_len + extra_len
        regions["local header"].append((info.header_offset, begin))
        short = info.filename.split("/", 1)[-1]
        kind = ("pickle" if short == "data.pkl" else "tensor data" if short.startswith("data/")
                else "small record")
        if info.file_size and not short.endswith("serialization_id"):
            regions[kind].append((begin, begin + info.file_size))
    regions["central directory"] = [(start_dir, len(data))]
    return {k: v for k, v in regions.items() if v}


def safetensors_regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    header_len = struct.unpack_from("<Q", data)[0]
    return {"header length": [(0, 8)], "json header": [(8, 8 + header_len)],
            "tensor data": [(8 + header_len, len(data))]}


def ckpt_regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    return {"protobuf start": [(0, min(64, len(data)))], "anywhere": [(0, len(data) - 17)],
            "crc trailer": [(len(data) - 17, len(data))]}


def regions_of(path: Path, data: bytes) -> dict[str, list[tuple[int, int]]]:
    if path.suffix == ".pt":
        return zip_regions(data)
    if path.suffix == ".safetensors":
        return safetensors_regions(data)
    if path.suffix == ".ckpt":
        return ckpt_regions(data)
    return {"json": [(0, len(data))]}


def mutations(files: list[Path], count: int, rng: random.Random) -> list[Mutation]:
    """`count` mutations spread over the files and each file's regions; one in six is a truncation."""
    chosen = []
    for i in range(count):
        path = files[i % len(files)]
        data = path.read_bytes()
        if (i // len(files)) % 6 == 5:
            chosen.append(Mutation(path, "truncation", rng.randrange(len(data)), 0))
            continue
        regions = regions_of(path, data)
        kind = sorted(regions)[(i // len(files) // 6 * 5 + (i // len(files)) % 6) % len(regions)]
        begin, end = rng.choice(regions[kind])
        chosen.append(Mutation(path, kind, rng.randrange(begin, end), rng.randrange(1, 256)))
    return chosen


# ---------------------------------------------------------------------------------------------
# The world: a fixture, its conversions, their outputs


def add_ckpt_crc_trailer(path: Path) -> None:
    """What save_checkpoint(crc_check=True) appends: b'crc_num' and the CRC-32 of the file, 10 bytes big-endian."""
    data = path.read_bytes()
    path.write_bytes(data + b"crc_num" + zlib.crc32(data).to_bytes(10, "big"))


def add_safetensors_crc(path: Path) -> None:
    """What save_checkpoint(crc_check=True, format='safetensors') records: __metadata__ crc_num, the
    CRC-32 over every tensor's name and bytes in sorted name order."""
    data = path.read_bytes()
    header_len = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8:8 + header_len])
    body = data[8 + header_len:]
    crc = 0
    for name in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[name]["data_offsets"]
        crc = zlib.crc32(body[begin:end], zlib.crc32(name.encode(), crc))
    header.setdefault("__metadata__", {})["crc_num"] = str(crc)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.fixture(scope="module")
def scratch():
    """A folder in memory where there is one: every run fsyncs its outputs, which on a busy disk
    would cost more than the conversion."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="mutations-", dir=shm if shm.is_dir() else None))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def world(scratch):
    root = scratch / "world"
    fixture = write_fixture(root / "save", SPEC, record=False)
    forward_args = [*fixture.convert_flags(), "--multiprocess-off"]
    code, log = in_process(pt2ckpt_main, [*forward_args, "--ms-path", root / "ms"])
    assert code == 0, log
    directions = {"forward": (pt2ckpt_main, forward_args, "--ms-path", outputs(root / "ms"),
                              sorted((fixture.megatron_path.rglob("*.pt")))
                              + sorted(fixture.param_map_dir.glob("*.json")))}
    for fmt, add_crc in (("ckpt", add_ckpt_crc_trailer), ("safetensors", add_safetensors_crc)):
        ms = root / f"ms-{fmt}"
        code, log = in_process(pt2ckpt_main, [*forward_args, "--ms-path", ms, "--format", fmt])
        assert code == 0, log
        [model] = ms.glob(f"rank_*/*.{fmt}")
        add_crc(model)
        back_args = ["--ms-path", ms, "--param-map-path", ms / "pt_meta", "--tp-size", SPEC.tp, "--pp-size",
                     SPEC.pp, "--dp-size", SPEC.dp, "--cp-size", 1, "--vpp-size", 1, "--src-model-format", fmt,
                     "--multiprocess-off"]
        code, log = in_process(ckpt2pt_main, [*back_args, "--megatron-path", root / f"back-{fmt}"])
        assert code == 0, log
        inputs = [model, *sorted((ms / "pt_meta").glob("args_*.pt"))]
        inputs += sorted((ms / "pt_meta").glob("param_map_*.json"))[:2]
        directions[f"back {fmt}"] = (ckpt2pt_main, back_args, "--megatron-path",
                                     outputs(root / f"back-{fmt}"), inputs)
    return root, directions


# ---------------------------------------------------------------------------------------------
# The run


def outcome(code, log: str, out: Path, baseline: dict) -> str:
    if code == "hang":
        return "hang"
    if isinstance(code, str) or "Traceback (most recent call last)" in log:
        return "traceback"
    left = outputs(out) if out.exists() else {}
    temporaries = [p for p in out.rglob("*") if ".partial" in p.name or p.suffix == ".tmp"] if out.exists() else []
    if code == 0:
        return "identical output" if left == baseline and not temporaries else "silent difference"
    errors = [line for line in log.splitlines() if " ERROR " in line]
    if code not in (1, 2) or not errors or any(CRASH.search(line) for line in errors):
        return "unclean error"
    if temporaries or any(is_rank_output(name) for name in left):
        return "partial file"
    if any(left[name] != baseline.get(name) for name in left):
        return "silent difference"  # a file at a final path that differs from the clean run's
    return "clean error"


def test_every_mutation_is_a_clean_error_or_changes_nothing(world, scratch):
    root, directions = world
    rng = random.Random(SEED)
    counts: Counter = Counter()
    bad = []
    per_direction = {"forward": 140, "back ckpt": 80, "back safetensors": 80}
    for name, (main, args, out_flag, baseline, inputs) in directions.items():
        for i, mutation in enumerate(mutations(inputs, per_direction[name], rng)):
            original = mutation.file.read_bytes()
            out = scratch / f"{name.replace(' ', '-')}-{i}"
            try:
                mutation.file.write_bytes(mutation.apply(original))
                code, log = in_process(main, [*args, out_flag, out])
            finally:
                mutation.file.write_bytes(original)
            result = outcome(code, log, out, baseline)
            counts["runs"] += 1
            counts[result] += 1
            if result not in ("clean error", "identical output"):
                errors = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
                bad.append(f"{name}: {mutation.file.name} {mutation.kind} @{mutation.offset} ^{mutation.xor:#x}: "
                           f"{result} (exit {code}) {errors[-1:] or log[-300:]}")
            shutil.rmtree(out, ignore_errors=True)
    print("\nmutation counts:", dict(counts))
    assert not bad, f"{len(bad)} of {counts['runs']} mutations misbehaved:\n" + "\n".join(bad[:40])
    assert counts["runs"] == sum(per_direction.values())
    assert counts["clean error"] > counts["runs"] // 2 and counts["identical output"] > 0
