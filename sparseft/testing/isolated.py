"""A Python environment without sparseft, to check what an export promises: that it loads with
transformers (and its remote code) alone.

:func:`python_without_sparseft` makes a virtual environment whose site-packages reach this
interpreter's installed packages by a path entry, so torch, transformers and safetensors are the
very versions the tests use and nothing is downloaded (seconds, not a ``pip install`` of torch).
Packages are only *reached*, so the ``.pth`` hooks of editable installs, sparseft's among them, do
not run there; the function checks that sparseft really is unimportable before returning.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path


def python_without_sparseft(directory: Path) -> Path:
    """Create (once) a virtual environment in ``directory`` without sparseft; its interpreter.

    Raises:
        RuntimeError: sparseft is importable there (installed into site-packages itself, not editable).
    """
    python = directory / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        installed = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib")])
        Path(purelib, "installed-packages.pth").write_text("".join(f"{path}\n" for path in installed))
    found = run_without_sparseft("import importlib.util; print(importlib.util.find_spec('sparseft'))", directory)
    if found.strip() != "None":
        raise RuntimeError(f"sparseft is importable without its editable install ({found.strip()}): this check "
                           "needs sparseft installed in editable mode (pip install -e .)")
    return python


def run_without_sparseft(code: str, directory: Path, timeout: float = 300) -> str:
    """Run ``code`` with the interpreter of :func:`python_without_sparseft`'s ``directory``, in that
    directory (not the repository, whose ``sparseft/`` would be importable from the working directory)
    and without ``PYTHONPATH``; its standard output.

    Raises:
        AssertionError: the code did not exit 0; the message ends with its stderr.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(directory / "bin" / "python"), "-c", code], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
