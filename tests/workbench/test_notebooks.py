"""Notebook conventions (DESIGN.md): one documented `parameters` cell of plain values that papermill
reads in full, no def/class, outputs stripped; the pipeline files aim only at parameters that exist."""
import ast
import re

import nbformat
import pytest

from cllama.workbench import pipeline as runs
from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PIPELINES = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))


def test_every_stage_has_a_notebook():
    names = [p.stem for p in NOTEBOOKS]
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(10)], names
    assert all(re.fullmatch(r"\d\d_[a-z]+_[a-z_]+|\d\d_[a-z]+", n) for n in names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = nbformat.read(path, 4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged parameters, want exactly 1"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {path.stem[:2]} ")
    names = []
    for line in tagged[0].source.splitlines():
        if not line.strip():
            continue
        [node] = ast.parse(line).body  # one plain assignment per line
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{path.name}: {line!r}"
        name = node.targets[0].id
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{path.name}: {name} is not snake_case"
        ast.literal_eval(node.value)  # a plain value, nothing computed
        code, sep, comment = line.partition("  # ")
        assert sep and comment.strip(), f"{path.name}: {name} has no trailing comment documenting it"
        names.append(name)
    assert "output_dir" in names, f"{path.name}: no output_dir parameter"
    seen = runs.notebook_parameters(path)  # papermill must read every one (e.g. no '=' in a comment)
    assert sorted(seen) == sorted(names), f"{path.name}: papermill reads {sorted(seen)}, the cell has {sorted(names)}"
    assert all(seen[n]["help"] for n in names)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit it without outputs"
        tree = ast.parse(cell.source)
        logic = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, THIN_CELLS_FORBID)]
        assert not logic, f"{path.name}: {logic} in a cell; notebooks call cllama, put the logic there"
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert re.search(r"write_\w*results\(", last.source), f"{path.name}: the last code cell must write results.json"


# What a thin notebook cell holds no trace of: control flow that chooses what to run, and definitions.
THIN_CELLS_FORBID = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.FunctionDef,
                     ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def test_the_thin_notebook_check_catches_control_flow():
    for source in ("if x:\n    y()", "y() if x else z()", "for i in x:\n    y(i)", "def f():\n    pass",
                   "try:\n    y()\nexcept Exception:\n    pass", "f = lambda: 1"):
        assert any(isinstance(n, THIN_CELLS_FORBID) for n in ast.walk(ast.parse(source))), source


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipelines_aim_at_parameters_that_exist(path):
    pipeline = runs.load_pipeline(path)  # validates every parameter, type and reference
    assert pipeline.stages[0].notebook.name == "00_environment.ipynb"
    runs.check_pipeline(pipeline)  # run YAMLs load, parallel layouts fit


def test_demo_runs_every_stage_notebook_but_the_comparison():
    used = {s.notebook.name for s in runs.load_pipeline(ROOT / "configs" / "pipelines" / "demo.yaml").stages}
    assert used == {p.name for p in NOTEBOOKS} - {"09_compare_runs.ipynb"}
