"""Resuming: which ranks an earlier run already finished, and which outputs are not ours.

Each plan (of either direction) has a manifest file next to its outputs; it records the plan's
fingerprint (the plan and its source files' identity), the converter version and the files written
with their sizes. A re-run compares it with its own plan to skip, redo or refuse a rank. A plan of
either direction has `folder`, `output_files`, `manifest_file`, `fingerprint` and `source_files()`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .atomic import write_text_atomically
from .errors import ConvertInputError


def plan_fingerprint(plan: Any) -> str:
    """Hash of the plan and of its source files' identity (path, size, mtime): equal fingerprints mean
    an existing output was written by this same conversion. The plan's paths must be canonical
    (resolved), so that spelling a path another way does not make a conversion look like another."""
    return fingerprint_of(plan, plan.source_files())


def fingerprint_of(plan: Any, sources: Sequence[Path]) -> str:
    """Hash of a plan (any dataclass; its repr) and of its source files' identity (path, size, mtime)."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    return hashlib.sha256(repr((plan, stats)).encode()).hexdigest()


def read_manifest(plan: Any) -> dict:
    try:
        return json.loads(plan.manifest_file.read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(plan: Any, state: str, files: dict[str, int] | None = None) -> None:
    write_text_atomically(plan.manifest_file, json.dumps(
        {"fingerprint": plan.fingerprint, "converter_version": __version__, "state": state,
         "source": str(plan.folder.path), "files": files or {}}, indent=1))


def withdraw_outputs(plan: Any) -> None:
    """An output that failed --verify: the manifest says "writing" first (our own unfinished work, which
    a re-run redoes), then the files go, so that no "complete" manifest ever describes a missing file."""
    write_manifest(plan, "writing")
    for path in plan.output_files:
        path.unlink(missing_ok=True)


def remove_unfinished_outputs(plan: Any) -> None:
    """After a worker that did not finish (stopped, killed, timed out, failed): the files it put at
    final paths while its manifest still said "writing" go, so that no file is left at a final path
    that no "complete" manifest vouches for. Files of another conversion or of a complete manifest
    are left alone."""
    manifest = read_manifest(plan)
    if manifest.get("fingerprint") == plan.fingerprint and manifest.get("state") == "writing":
        for path in plan.output_files:
            path.unlink(missing_ok=True)


def rank_status(plan: Any) -> str:
    """'done' (complete output of this conversion, written by this version of the converter), 'todo',
    'outdated' (output of this conversion written by another version of the converter, which may have
    had a bug this one fixes: it is converted again, never skipped), or 'foreign' (outputs exist that
    this conversion did not write, which must not be silently mixed with new ones)."""
    manifest = read_manifest(plan)
    if manifest.get("fingerprint") == plan.fingerprint:
        if manifest.get("converter_version") != __version__:
            return "outdated"
        files = manifest.get("files", {})
        complete = manifest.get("state") == "complete" and all(
            Path(f).is_file() and Path(f).stat().st_size == size for f, size in files.items())
        return "done" if complete else "todo"
    return "foreign" if any(p.exists() for p in plan.output_files) else "todo"


def check_no_foreign_outputs(plans: Sequence[Any], statuses: dict, flag: str = "--ms-path",
                             root: Path | None = None) -> None:
    """Stop when any plan's status (from rank_status, by folder) is 'foreign'. `flag` and `root` name
    the output folder in the message (by default --ms-path, the parent of the first rank's folder)."""
    foreign = [p for p in plans if statuses[p.folder] == "foreign"]
    if foreign:
        existing = [str(o) for p in foreign for o in p.output_files if o.exists()]
        root = root if root is not None else foreign[0].outputs[0].parent.parent
        raise ConvertInputError(
            f"{flag} {root}: {len(existing)} output files already exist that "
            f"this conversion did not write (another source, other flags, changed inputs, or a version of "
            f"the converter that planned differently), e.g. {existing[0]}",
            expected="an empty --ms-path or outputs of this same conversion", found=f"{len(foreign)} ranks' outputs",
            fix=f"pass --overwrite to replace them, or choose another {flag}")
