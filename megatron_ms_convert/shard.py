"""Sharing one conversion among several processes (hosts) with no coordination service: each takes
share I of N of the rank folders, computed the same way by every share from the folder list and the
file sizes alone, so shards never need to talk to each other.

    >>> Shard.parse("1/3")
    Shard(index=1, count=3, origin='--shard 1/3')
    >>> assign([("a", 10), ("b", 7), ("c", 5), ("d", 4)], 2)
    (('a', 'd'), ('b', 'c'))
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

from .errors import ConvertInputError
from .folder_lock import RUN_LOCK_NAME

_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Share `index` (0-based) of `count`; `origin` says where the numbers came from, for the log."""

    index: int
    count: int
    origin: str

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str, environ: Mapping[str, str] | None = None) -> "Shard":
        """`I/N`, or `auto` to read the launcher's environment."""
        if text == "auto":
            return from_launcher(environ if environ is not None else {})
        match = _SHARD.match(text)
        if not match:
            raise ConvertInputError(f"--shard {text}", expected="I/N (0 <= I < N) or auto", found=repr(text),
                                    fix="pass --shard I/N (e.g. 0/4), or --shard auto under Slurm, torchrun or MPI")
        return cls.checked(int(match.group(1)), int(match.group(2)), f"--shard {text}")

    @classmethod
    def checked(cls, index: int, count: int, origin: str) -> "Shard":
        if count < 1 or not 0 <= index < count:
            raise ConvertInputError(f"{origin}: share {index} of {count}", expected="0 <= I < N and N >= 1",
                                    found=f"I={index}, N={count}", fix="pass --shard I/N with 0 <= I < N")
        return cls(index, count, origin)


# Each launcher's (rank variable, size variable), in the order they are asked: the process-level
# launchers first, since torchrun or mpirun may themselves run inside a Slurm allocation.
_PROCESS_LAUNCHERS = (("torchrun", "RANK", "WORLD_SIZE"),
                      ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                      ("PMI", "PMI_RANK", "PMI_SIZE"))


def from_launcher(environ: Mapping[str, str]) -> Shard:
    """The share a launcher gave this process: torchrun, Open MPI, PMI, then Slurm (a job step's
    tasks, a job array's tasks, or both: task t of step s in array element a of A is share
    a * ntasks + t of A * ntasks)."""
    for name, rank_var, size_var in _PROCESS_LAUNCHERS:
        if rank_var in environ and size_var in environ:
            origin = f"--shard auto ({name}: {rank_var}={environ[rank_var]} {size_var}={environ[size_var]})"
            return Shard.checked(_int(environ, rank_var), _int(environ, size_var), origin)
    array = _slurm_array(environ)
    step = _slurm_step(environ)
    if array or step:
        a_index, a_count, a_text = array or (0, 1, "")
        s_index, s_count, s_text = step or (0, 1, "")
        origin = "--shard auto (Slurm: " + " ".join(t for t in (a_text, s_text) if t) + ")"
        return Shard.checked(a_index * s_count + s_index, a_count * s_count, origin)
    raise ConvertInputError(
        "--shard auto: no launcher's variables are set",
        expected="SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_MIN/MAX, SLURM_PROCID/SLURM_NTASKS, RANK/WORLD_SIZE, "
                 "OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/PMI_SIZE",
        found="none of them", fix="run under the launcher, or pass --shard I/N")


def _slurm_array(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    missing = [v for v in ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX") if v not in environ]
    if missing:
        raise ConvertInputError("--shard auto: SLURM_ARRAY_TASK_ID is set without " + " and ".join(missing),
                                expected="the array's bounds", found="an incomplete Slurm environment",
                                fix="pass --shard I/N")
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX")
    task, low, high = (_int(environ, v) for v in names)
    step = _int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    if step < 1 or (task - low) % step or not low <= task <= high:
        raise ConvertInputError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} in array {low}-{high}:{step}",
                                expected="an array of evenly spaced task ids", found="an id outside it",
                                fix="pass --shard I/N")
    return (task - low) // step, (high - low) // step + 1, f"SLURM_ARRAY_TASK_ID={task} of {low}-{high}"


def _slurm_step(environ: Mapping[str, str]) -> tuple[int, int, str] | None:
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return None
    count = _int(environ, "SLURM_NTASKS")
    if count <= 1:
        return None  # one task per array element: the array alone decides
    index = _int(environ, "SLURM_PROCID")
    return index, count, f"SLURM_PROCID={index} SLURM_NTASKS={count}"


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConvertInputError(f"--shard auto: {name}={environ[name]!r}", expected="a whole number",
                                found=repr(environ[name]), fix="pass --shard I/N") from None


def assign(items: Sequence[tuple[Hashable, int]], count: int) -> tuple[tuple[Hashable, ...], ...]:
    """Split (key, bytes) items into `count` shares of nearly equal bytes: largest first, each to the
    share with the fewest bytes so far (ties: the lower share). A pure function of its input, so every
    shard computes the same split; keys keep their input order inside a share."""
    loads = [0] * count
    owner: dict[Hashable, int] = {}
    for position, (key, size) in sorted(enumerate(items), key=lambda item: (-item[1][1], item[0])):
        share = min(range(count), key=lambda s: (loads[s], s))
        owner[key] = share
        loads[share] += size
    return tuple(tuple(key for key, _ in items if owner[key] == share) for share in range(count))


def lock_name(shard: Shard | None) -> str:
    """The lock a run holds in its output folder: the whole folder's, or one of its own per shard
    (so shards run side by side while two processes given the same share cannot).

    >>> lock_name(None), lock_name(Shard(1, 4, "--shard 1/4"))
    ('.convert.lock', '.convert.shard-1-of-4.lock')
    """
    return RUN_LOCK_NAME if shard is None else f".convert.shard-{shard.index}-of-{shard.count}.lock"


def own_share(items: Sequence, shard: Shard | None, size_of) -> tuple:
    """The items (plans) of this shard, split by `size_of(item)` bytes; all of them without a shard."""
    if shard is None:
        return tuple(items)
    mine = set(assign([(i, size_of(item)) for i, item in enumerate(items)], shard.count)[shard.index])
    return tuple(item for i, item in enumerate(items) if i in mine)


def add_shard_flags(parser: argparse.ArgumentParser, output_flag: str) -> None:
    """--shard and --check, the same in both directions."""
    group = parser.add_argument_group(title="Many hosts (not in the documented tool)")
    group.add_argument("--shard", type=str, default=None, metavar="I/N|auto",
                       help="convert only share I of N (0-based) of the rank folders, balanced by bytes; 'auto' "
                            f"takes I and N from Slurm, torchrun or MPI. Shards share one {output_flag}")
    group.add_argument("--check", action="store_true", default=False,
                       help="convert nothing: report which rank folders of the whole conversion are complete, "
                            "missing or from another conversion; exit 0 only when all are complete")


# rank_status's words, as --check reports them
CHECK_WORDS = {"done": "complete", "todo": "missing", "foreign": "from another conversion",
               "outdated": "written by another version of the converter"}


def log_check(plans: Sequence[Any], statuses: Mapping[Any, str], describe: Callable[[Any], tuple[str, str]],
              log: logging.Logger) -> bool:
    """--check's report: one line per plan (source -> target: state) and a summary; True when every
    plan's outputs are complete. `statuses` is keyed by plan.folder, as rank_status gives them."""
    for plan in plans:
        status = statuses[plan.folder]
        source, target = describe(plan)
        (log.info if status == "done" else log.error)("check: '%s' -> '%s': %s", source, target, CHECK_WORDS[status])
    counts = [sum(1 for s in statuses.values() if s == key) for key in CHECK_WORDS]
    log.info("check: %d complete, %d missing, %d from another conversion, %d written by another version, "
             "of %d folders", *counts, len(plans))
    return all(s == "done" for s in statuses.values())
