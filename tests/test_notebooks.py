"""The notebooks in notebooks/ are committed with their outputs, still run top to bottom, and stay thin.

Committed with outputs (figures, numbers), they read on GitHub without running. The test executes a
copy of each with nbclient in a fresh `python3` kernel (the committed file is never rewritten) and
checks that the committed outputs are the ones its code prints: every cell that prints has its
output committed, with the same text up to the numbers. jupyter_client starts a kernelspec whose
command is plain `python` with `sys.executable`, and the interpreter's directory is put first on
PATH as well, so the kernel runs in the same environment as pytest (and inherits its XLA_FLAGS).
Here figures go to the Agg backend (not drawn); the committed figures are PNGs.

To commit a notebook after changing it or the library: `python tests/test_notebooks.py [NAME ...]`
executes the notebooks (all, or those whose names contain a NAME) and writes them back with their
outputs, figures at 80 dpi, and nothing that changes from run to run (no timings, no Python version).
"""
import ast
import copy
import os
import re
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
MAX_BYTES = 1_000_000  # a committed notebook, figures included
FIGURE_DPI = 80
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _ids(paths):
    return [p.stem for p in paths]


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _kernel_environment() -> dict:
    """The environment variables a notebook kernel needs: this interpreter first on PATH."""
    return {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}  # quiet debugpy warning in the kernel


def execute(nb):
    """Run every cell of `nb` in order in a fresh kernel (in notebooks/), filling in its outputs;
    raises CellExecutionError, with the traceback, on the first failing cell."""
    arguments = [f"--InlineBackend.print_figure_kwargs={{'bbox_inches': 'tight', 'dpi': {FIGURE_DPI}}}"]
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                            record_timing=False, extra_arguments=arguments,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()
    return nb


def cleared(nb):
    """A copy of `nb` without outputs or execution counts."""
    nb = copy.deepcopy(nb)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    return nb


def printed_text(cell) -> str:
    """What a code cell printed to stdout, with every number replaced by '#' and whitespace
    collapsed: the same code prints the same text, while the last digits may vary by machine."""
    text = "".join(out.text for out in cell.outputs
                   if out.output_type == "stream" and out.name == "stdout")
    return " ".join(NUMBER.sub("#", text).split())


def strip_volatile(nb):
    """Drop what changes from run to run or machine to machine: cell timings and the kernel's
    language version."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata["language_info"] = {"name": nb.metadata.get("language_info", {}).get("name", "python")}
    return nb


def test_every_notebook_of_the_issue_is_present():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}, f"missing: {EXPECTED - {p.stem for p in NOTEBOOKS}}"


def test_python3_kernel_runs_this_interpreter():
    # A `python3` kernelspec earlier on the Jupyter path (e.g. a user-level one) could point elsewhere.
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert os.path.realpath(command[0]) == os.path.realpath(sys.executable), (
        f"the python3 kernel runs {command[0]}, not {sys.executable}; "
        f"run `{sys.executable} -m ipykernel install --sys-prefix` or remove the other kernelspec")


def test_number_mask_keeps_the_words():
    assert " ".join(NUMBER.sub("#", "slope = -0.99   errors 3.9e-01 [0.2   0.246]\n").split()) == \
        "slope = # errors # [# #]"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_with_outputs_and_runs_top_to_bottom(path, monkeypatch):
    refresh = f"run `python tests/test_notebooks.py {path.stem}` and commit the notebook"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes; lower the figure dpi"
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    cells = _code_cells(committed)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), \
        f"{path.name}: execution counts {counts}, not one run top to bottom; {refresh}"
    for index, cell in enumerate(committed.cells):
        assert "execution" not in cell.metadata, f"{path.name}: cell {index} has execution timings; {refresh}"
        errors = [out for out in cell.get("outputs", []) if out.output_type == "error"]
        assert not errors, f"{path.name}: cell {index} has an error output; {refresh}"
    assert any("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs), \
        f"{path.name}: no figure committed; {refresh}"

    for name, value in {**_kernel_environment(), "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, value)
    start = time.perf_counter()
    fresh = execute(cleared(committed))
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
    assert any(cell.outputs for cell in _code_cells(fresh)), f"{path.name} printed nothing"
    for index, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if new.cell_type != "code":
            continue
        assert old.outputs or not new.outputs, f"{path.name}: cell {index} has output but none is committed; {refresh}"
        assert printed_text(old) == printed_text(new), (
            f"{path.name}: cell {index} now prints\n{printed_text(new)}\nbut the committed output reads\n"
            f"{printed_text(old)}\n{refresh}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_measured_texts_quote_the_committed_outputs(path):
    # A markdown cell that starts with "**Measured.**" reports what the cells above it printed: each of
    # its measured values (numbers with a decimal point or an exponent) must appear in their output.
    nb = nbformat.read(path, as_version=4)
    printed, measured_cells = set(), 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for out in cell.outputs:
                if out.output_type == "stream" and out.name == "stdout":
                    printed |= {number.lstrip("+-") for number in NUMBER.findall(out.text)}
        elif cell.source.startswith("**Measured.**"):
            measured_cells += 1
            quoted = [n.lstrip("+-") for n in NUMBER.findall(cell.source) if re.search(r"[.eE]", n)]
            missing = [n for n in quoted if n not in printed]
            assert not missing, f"{path.name}: cell {index} quotes {missing}, which no cell above printed"
    assert measured_cells, f"{path.name}: no '**Measured.**' cell states what the notebook shows"


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


def write_with_outputs(path: Path) -> None:
    """Execute the notebook at `path` in a fresh kernel and write it back with its outputs."""
    nb = nbformat.read(path, as_version=4)
    os.environ.update(_kernel_environment())
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures as PNGs
    start = time.perf_counter()
    nb = strip_volatile(execute(cleared(nb)))
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s, {path.stat().st_size} bytes written")


if __name__ == "__main__":
    names = sys.argv[1:]
    for notebook in NOTEBOOKS:
        if not names or any(name in notebook.stem for name in names):
            write_with_outputs(notebook)
