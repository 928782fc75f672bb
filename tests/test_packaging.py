"""What `pip install .` puts into site-packages: the package, the two command modules and their console
scripts, nothing else at top level (no generic module names such as `param_map_utils` that could shadow
another project's: that one is installed inside the package). Installed, the commands name themselves
as typed and answer -h without loading torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.expected_outputs import REPO
from tests.helpers import assert_nothing_heavy

TOP_LEVEL = {"megatron_ms_convert", "convert_pt2ckpt.py", "convert_ckpt2pt.py"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "data", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [built] = (tmp_path / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """The wheel installed into a folder of its own (its console scripts in bin/), away from the checkout."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, cwd=target)
    return target


def test_wheel_holds_the_package_the_command_modules_and_the_console_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == TOP_LEVEL, sorted(top)
    for module in ("topology", "naming", "plan", "runner", "atomic", "errors", "flags", "param_map_utils",
                   "megatron/checkpoint", "megatron/layout", "mindspore/format", "mindspore/writer",
                   "mindspore/reader", "pt2ckpt", "ckpt2pt"):
        assert f"megatron_ms_convert/{module}.py" in names, module
    assert not any(name.startswith("megatron_ms_convert/") and "tests" in name for name in names)
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "convert_pt2ckpt = convert_pt2ckpt:cli" in text
    assert "convert_ckpt2pt = convert_ckpt2pt:cli" in text


def test_installed_param_map_utils_lives_inside_the_package(installed):
    assert not (installed / "param_map_utils.py").exists()
    code = ("import importlib.util, sys; assert importlib.util.find_spec('param_map_utils') is None; "
            "from megatron_ms_convert.param_map_utils import infer_layouts, read_rank_layouts; "
            "import megatron_ms_convert; print(megatron_ms_convert.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=installed,
                          env={**os.environ, "PYTHONPATH": str(installed)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(installed / "megatron_ms_convert" / "__init__.py")


@pytest.mark.parametrize("command", ["convert_pt2ckpt", "convert_ckpt2pt"])
def test_installed_commands_name_themselves_and_answer_help_without_torch(installed, command):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    script = installed / "bin" / command
    proc = subprocess.run([sys.executable, "-X", "importtime", str(script), "-h"], capture_output=True, text=True,
                          timeout=120, cwd=installed, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {command} [-h]"), proc.stdout[:200]
    assert_nothing_heavy(proc)
    error = subprocess.run([str(script), "--no-such-flag"], capture_output=True, text=True, timeout=120,
                           cwd=installed, env=env)
    assert error.returncode == 2 and f"usage: {command} [-h]" in error.stderr, error.stderr
