"""The notebooks run top to bottom on simulated data, and are kept in git without outputs.

Each notebook is executed with nbclient in a kernel that is *this* interpreter: the
kernel spec is written to a temporary directory from `ipykernel` of the running Python
(`sys.executable`), and only that directory is searched, so neither a user-level
`python3` kernel spec nor a missing one can change which Python runs the notebooks. A
fresh virtualenv with the dev extras is enough.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """Kernel specs holding exactly one kernel: the running interpreter's ipykernel."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL)
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def run_notebook(nb: nbformat.NotebookNode, specs: KernelSpecManager,
                 timeout_s: int = 600) -> nbformat.NotebookNode:
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=timeout_s,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return nb


def test_there_are_notebooks() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"01_explore_events.ipynb", "02_tune_thresholds.ipynb",
            "03_model_drift.ipynb"} <= names


def test_the_kernel_is_this_interpreter(kernel_specs: KernelSpecManager) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, sys\nprint(sys.executable)\nprint(os.getcwd())")])
    out = run_notebook(nb, kernel_specs, timeout_s=120)
    printed = out.cells[0].outputs[0]["text"].split("\n")
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve()
    assert Path(printed[1]).resolve() == NOTEBOOK_DIR.resolve()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, kernel_specs: KernelSpecManager) -> None:
    nb = nbformat.read(path, as_version=4)
    run_notebook(nb, kernel_specs)  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has outputs"
            assert cell.execution_count is None, f"{path.name}: a code cell has a count"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT,
                             capture_output=True, check=False)
    if tracked.returncode == 0:  # the committed version must be clean too
        committed = subprocess.run(["git", "show", f"HEAD:notebooks/{path.name}"], cwd=ROOT,
                                   capture_output=True, text=True, check=False)
        if committed.returncode == 0:
            stored = nbformat.reads(committed.stdout, as_version=4)
            assert all(c.outputs == [] for c in stored.cells if c.cell_type == "code"), (
                f"{path.name}: the committed notebook has outputs")
