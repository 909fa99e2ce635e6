"""The installed package, not a folder named like it in the current directory, runs in Ray workers.

Ray puts the driver's current folder at the front of every worker's ``sys.path``. Run from the
folder that contains a clone (``~`` with the clone at ``~/mmbatch``) or from any folder holding an
``mmbatch/`` directory, workers used to import that folder instead of the installed package and
``mmbatch ingest`` died with ``AttributeError: module 'mmbatch' has no attribute '__version__'``.
These tests run the real ``mmbatch`` console script from such folders.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import mmbatch
from mmbatch.demo.corpus import write_imagenet

pytestmark = pytest.mark.slow          # the fast tier (`pytest -m "not slow"`) skips this module

PACKAGE_ROOT = Path(mmbatch.__file__).resolve().parents[1]      # the folder holding the package under test
MMBATCH_SCRIPT = Path(sys.executable).parent / "mmbatch"


def run_cli(args: list[str], cwd: Path, tmp_path: Path, pythonpath: Path = PACKAGE_ROOT) -> subprocess.CompletedProcess:
    # PYTHONPATH pins the driver to the package under test (this checkout), as an install would;
    # the console script itself does not put its working folder on sys.path, Ray's workers do.
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "RAY_ADDRESS": ""}
    return subprocess.run([str(MMBATCH_SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("corpus"), per_class=2)


def test_ingest_from_a_folder_holding_a_decoy_mmbatch_package(tmp_path, tiny_corpus):
    assert MMBATCH_SCRIPT.exists(), f"the mmbatch console script is not installed next to {sys.executable}"
    work = tmp_path / "work"
    (work / "mmbatch").mkdir(parents=True)
    (work / "mmbatch" / "__init__.py").write_text('"""not the real package: no __version__"""\n')
    out = tmp_path / "canonical"
    p = run_cli(["ingest", "imagenet", str(tiny_corpus), "--out", str(out)], cwd=work, tmp_path=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "__version__" not in p.stderr
    assert (out / "_manifest.json").exists()


# What `pip install -e .` installs (setuptools' editable finder, a meta-path finder loaded from a .pth
# file), pointed at the package under test. Unlike a PYTHONPATH entry, a meta-path finder runs after
# sys.path's PathFinder, so a clone's top folder (no __init__.py) in the current folder wins as a
# namespace package: the case users hit from the parent of their clone.
EDITABLE_FINDER = """
import sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location

PACKAGE_DIR = {package_dir!r}


class EditableFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == "mmbatch":
            return spec_from_file_location(fullname, PACKAGE_DIR + "/__init__.py",
                                           submodule_search_locations=[PACKAGE_DIR])
        if fullname.startswith("mmbatch."):
            parent, _, _ = fullname.rpartition(".")
            return PathFinder.find_spec(fullname, path=[PACKAGE_DIR + parent[len("mmbatch"):].replace(".", "/")])
        return None


sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableFinder)
"""


def test_ingest_from_the_parent_of_a_clone_with_an_editable_install(tmp_path, tiny_corpus):
    """cwd = the folder holding a clone (``~`` with the clone at ``~/mmbatch``), package installed editable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(EDITABLE_FINDER.format(package_dir=str(PACKAGE_ROOT / "mmbatch")))
    home = tmp_path / "home"
    clone = home / "mmbatch"                       # the repository folder: no __init__.py at its top
    (clone / "mmbatch").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("[project]\nname = 'mmbatch'\n")
    (clone / "README.md").write_text("# mmbatch\n")
    out = tmp_path / "canonical"
    p = run_cli(["ingest", "imagenet", str(tiny_corpus), "--out", str(out)], cwd=home, tmp_path=tmp_path,
                pythonpath=site)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "__version__" not in p.stderr
    assert (out / "_manifest.json").exists()


DATA_PIPELINE = """
from mmbatch.data import Embed, read_canonical

ds = read_canonical({canonical!r}).map_batches(
    Embed, fn_constructor_args=("image", {{"image": {{"extractor": "hog", "size": 32}}}}),
    batch_format="pyarrow", compute=__import__("ray").data.ActorPoolStrategy(size=1))
rows = ds.take_all()
print("embedded", len(rows), sum(r["image_error"] is None for r in rows))
"""


def test_mmbatch_data_pipeline_from_a_folder_holding_an_empty_mmbatch_folder(tmp_path, tiny_corpus):
    """README's `mmbatch.data` example run from the folder above a clone (an editable install): Ray's workers
    put that folder first on sys.path, where `mmbatch/` is a namespace package without `__version__`."""
    canonical = tmp_path / "canonical"
    p = run_cli(["ingest", "imagenet", str(tiny_corpus), "--out", str(canonical)], cwd=tmp_path, tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(EDITABLE_FINDER.format(package_dir=str(PACKAGE_ROOT / "mmbatch")))
    home = tmp_path / "home"
    (home / "mmbatch").mkdir(parents=True)             # the clone's top folder, seen from its parent
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-c", DATA_PIPELINE.format(canonical=str(canonical))], cwd=home, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in canonical.glob("*.parquet"))
    assert rows > 0 and f"embedded {rows} {rows}" in p.stdout, p.stdout[-2000:]      # every row, no error
    assert "__version__" not in p.stderr
