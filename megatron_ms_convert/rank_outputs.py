"""How every worker (either direction, re-sharding or not) ends a rank once its files are written:
the manifest says "complete" with the files' sizes, --verify reads the outputs back (an output that
fails is withdrawn: manifest first, then the files, so that no final path holds a wrong file), and
one debug line sums the rank up. A plan of either direction has `folder`, `output_files` and
`manifest_file`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .errors import VerificationError
from .manifest import withdraw_outputs, write_manifest
from .runner import ByteCounter, Progress, RankResult, RunSettings

log = logging.getLogger(__name__)

# reads a rank's outputs back, counting the bytes compared: (tensors compared, files compared)
Verify = Callable[[ByteCounter], "tuple[int, int]"]


def mark_complete(plan: Any, result: RankResult, tensors: int) -> None:
    """Every file of the plan is at its final path: the manifest says so before --verify reads them
    back (docs/output-format.md, "Manifests")."""
    write_manifest(plan, "complete", {str(p): p.stat().st_size for p in plan.output_files})
    result.status, result.tensors = "converted", tensors


def verify_if_asked(plan: Any, result: RankResult, settings: RunSettings, progress: Progress, verify: Verify) -> None:
    """With --verify, read the outputs back (`verify`); an output that fails is withdrawn and the
    VerificationError raised."""
    if not settings.verify:
        return
    try:
        result.verified_tensors, result.verified_files = verify(ByteCounter(progress, "verify"))
    except VerificationError:
        withdraw_outputs(plan)
        raise


def log_rank_end(plan: Any, result: RankResult) -> None:
    log.debug("%s: %d tensors, %d bytes written, peak anonymous memory %.1f MiB", plan.folder.name,
              result.tensors, result.bytes_written, result.peak_anon_bytes / 2**20)
