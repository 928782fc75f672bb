"""Keep pytest (which collects every module for doctests) from importing what only the real-Megatron
worker processes may import: the stand-in packages would shadow real ones on sys.path, and the worker
patches torch's CUDA entry points for the CPU when imported.

The shared fixtures live here, the shared helpers in tests/helpers.py: test modules import from
neither each other nor fixtures by name."""

import shutil

import pytest

from tests.expected_outputs import SAMPLE, run_cli
from tests.helpers import RANKS, SIZES

collect_ignore = ["megatron_stubs", "real_megatron_worker.py"]


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the Megatron-written sample."""
    root = tmp_path / "save"
    shutil.copytree(SAMPLE, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture(scope="module")
def clean_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    proc = run_cli("--megatron-path", SAMPLE / "iter_0000010", "--ms-path", out, *SIZES)
    assert proc.returncode == 0, proc.stdout
    return {rank: (out / f"rank_{rank}/network.ckpt").read_bytes() for rank in RANKS}
