"""The notebooks in notebooks/ run top to bottom, stay thin, and are committed without outputs.

Each notebook is executed with nbclient in a fresh `python3` kernel. jupyter_client starts a kernelspec
whose command is plain `python` with `sys.executable`, and the interpreter's directory is put first
on PATH as well, so the kernel runs in the same environment as pytest. Figures go to the Agg backend.
"""
import ast
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = {"01_resnet_is_euler", "02_adjoints", "03_multigrid_unet", "04_gradient_flow"}
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [p.stem for p in paths]


def test_every_notebook_of_the_issue_is_present():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, f"missing: {EXPECTED - {p.stem for p in NOTEBOOKS}}"


def test_python3_kernel_runs_this_interpreter():
    # A `python3` kernelspec earlier on the Jupyter path (e.g. a user-level one) could point elsewhere.
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert os.path.realpath(command[0]) == os.path.realpath(sys.executable), (
        f"the python3 kernel runs {command[0]}, not {sys.executable}; "
        f"run `{sys.executable} -m ipykernel install --sys-prefix` or remove the other kernelspec")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
            assert "execution" not in cell.metadata, f"{path.name}: cell {index} has execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_thin_imports_from_neuralode_and_defines_nothing_reusable(path):
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    tree = ast.parse(source)
    defined = [node.name for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert not defined, f"{path.name} defines {defined}; reusable code belongs in the neuralode package"
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "neuralode" in imported, f"{path.name} does not import neuralode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy warning in the kernel
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, on the first failing cell
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    assert any(cell.outputs for cell in nb.cells if cell.cell_type == "code"), f"{path.name} printed nothing"
