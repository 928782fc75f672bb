"""What `pip install .` puts into site-packages: the package, the three named modules and the console
script, nothing else at top level (no generic module names that could shadow another project's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.expected_outputs import REPO

TOP_LEVEL = {"megatron_ms_convert", "convert_pt2ckpt.py", "convert_ckpt2pt.py", "param_map_utils.py"}


def test_wheel_holds_the_package_the_named_modules_and_the_console_script(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "data", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == TOP_LEVEL, sorted(top)
    for module in ("topology", "naming", "plan", "runner", "atomic", "errors", "megatron/checkpoint",
                   "megatron/layout", "mindspore/format", "mindspore/writer", "mindspore/reader", "pt2ckpt", "ckpt2pt"):
        assert f"megatron_ms_convert/{module}.py" in names, module
    assert not any(name.startswith("megatron_ms_convert/") and "tests" in name for name in names)
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "convert_pt2ckpt = convert_pt2ckpt:cli" in text
    assert "convert_ckpt2pt = convert_ckpt2pt:cli" in text
