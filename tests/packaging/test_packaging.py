"""The sdist holds everything a build from it needs: every csrc/ source and header, the package data, the presets.

A review found csrc/*.h missing from an sdist (no MANIFEST.in): the wheel build from it then fails in the C++ compile.
Here we only list the tarball (seconds); building a wheel from it compiles the extension (minutes), which
`make sdist-check` and `make cuda-build-check` do.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SDIST_TIMEOUT_S = 300  # setup.py imports torch; a loaded 2-core machine takes ~10 s
pytestmark = pytest.mark.slow  # one `python -m build --sdist` subprocess for the module


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")}


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory) -> set[str]:
    """Paths inside the sdist, relative to its top folder (dash_rl-<version>/)."""
    out = tmp_path_factory.mktemp("sdist")
    # --no-isolation: setup.py imports torch; an isolated build would download one. -x: the requirements are checked
    # by the venv's install, not again here.
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-x", "--outdir", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=SDIST_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    (tarball,) = out.glob("*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return {name.split("/", 1)[1] for name in names}


def test_sdist_has_every_csrc_file(sdist_members):
    csrc = _files_under(ROOT / "csrc")
    assert any(name.endswith(".h") for name in csrc) and any(name.endswith(".cu") for name in csrc)
    assert csrc - sdist_members == set()


def test_sdist_has_package_data_presets_and_build_files(sdist_members):
    wanted = _files_under(ROOT / "dash" / "assets") | _files_under(ROOT / "configs")
    wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "dash_kernels/build_compat.py"}
    assert wanted - sdist_members == set()


def test_sdist_has_every_package_module(sdist_members):
    modules = {name for package in ("dash", "dash_kernels") for name in _files_under(ROOT / package)
               if name.endswith(".py")}
    assert modules - sdist_members == set()


def test_sdist_has_no_build_outputs(sdist_members):
    leaked = {name for name in sdist_members if name.endswith((".so", ".pyc", "_C_build.json"))}
    assert leaked == set()
