"""What `pip install` puts into site-packages: everything under the `mixserve` name (and its generated
`mixserve_pb` stubs), never top-level `router`, `shards` or `benchmarks` packages that could collide
with others of those names; the dependencies are router/requirements.txt and shards/requirements.txt.

In the repository the folders stay at the top (mixserve/router, mixserve/shards and mixserve/benchmarks
are links to them), so a module imported by its short name would be a second copy of it: no code
does that.
"""

import ast
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from child_processes import PYTHON, REPO

MOVED = ("router", "shards", "benchmarks")


def tracked_python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / name for name in listed.stdout.split()]


def short_name_imports(path: Path) -> list[str]:
    """The imports in `path` that name router, shards or benchmarks as top-level packages."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in MOVED]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] if node.module.split(".")[0] in MOVED else []
    return found


def test_no_module_imports_a_package_by_its_short_name():
    offenders = {str(p.relative_to(REPO)): names for p in tracked_python_files() if (names := short_name_imports(p))}
    assert offenders == {}


def test_the_short_name_check_finds_every_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import router.engine\nfrom shards import ops\ndef f():\n    from benchmarks.serve import x\n")
    assert short_name_imports(source) == ["router.engine", "shards", "benchmarks.serve"]
    source.write_text("from mixserve.router import engine\nimport mixserve.shards.ops\nfrom . import x\n")
    assert short_name_imports(source) == []


def requirements(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_holds_mixserve_and_its_stubs_only(tmp_path):
    # Built from a copy: pip builds in the source tree, and setuptools' build/ would keep files between runs.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "results", ".*_cache", ".hypothesis")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=280,
    )
    (wheel,) = tmp_path.glob("mixserve-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        lines = z.read(metadata).decode().splitlines()
    requires = [line.removeprefix("Requires-Dist: ") for line in lines if line.startswith("Requires-Dist: ")]
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"mixserve", "mixserve_pb"}
    for part in ("mixserve/router/engine.py", "mixserve/shards/kernels/sampling.c", "mixserve/shards/demo/corpus.txt"):
        assert part in names
    assert any(n.startswith("mixserve/shards/kernels/") and n.endswith(".h") for n in names)
    # The install's dependencies are the two files, in order, with nothing else unconditional.
    expected = requirements(REPO / "router/requirements.txt") + requirements(REPO / "shards/requirements.txt")
    assert [r for r in requires if ";" not in r] == expected
