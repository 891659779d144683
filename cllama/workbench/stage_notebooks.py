"""Stage notebooks as a pipeline sees them before running anything: the file is a Jupyter notebook
with a `parameters` cell (`read_notebook`), its parameters as papermill reads them
(`notebook_parameters`), and the names it writes into results.json (`outputs`): the string keys of the
`artifacts={...}`, `metrics={...}` and `params={...}` dict literals of its `write_*results(...)` calls,
read with `ast` without executing it. What cannot be read that way (a computed key, a dict built
elsewhere, a helper such as write_eval_results) is listed as unread, not guessed.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from cllama.runtime import REPO_ROOT

OUTPUT_KINDS = ("artifacts", "metrics", "params")
POSITION = {"metrics": 2, "artifacts": 3, "params": 5}  # in write_results(output_dir, stage, metrics, artifacts, ...)
WRITER = re.compile(r"write_\w*results")


def shown(path: str | os.PathLike) -> str:
    """A notebook path as messages show it: relative to the repository when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def read_notebook(path: str | os.PathLike, where: str = "pipeline") -> dict:
    """The notebook's JSON, checked: UTF-8 JSON, an object with a list of cells, one cell tagged
    `parameters`. Errors are ValueError naming `where` (e.g. "PIPELINE: stage 'NAME'") and the file."""
    path = Path(path)
    bad = f"{where}: notebook {shown(path)} is not a Jupyter notebook"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{where}: notebook {shown(path)} cannot be read ({err.strerror or err})") from None
    if not data.strip():
        raise ValueError(f"{bad} (the file is empty); save it again from JupyterLab or point the stage at a "
                         "notebook")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{bad} (not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{bad} (JSON error at line {err.lineno}: {err.msg})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{bad} (its JSON is {type(doc).__name__ if doc is not None else 'null'}, not an object "
                         "with cells, metadata, nbformat)")
    if doc.get("nbformat") != 4:
        raise ValueError(f"{where}: notebook {shown(path)} is not an nbformat 4 Jupyter notebook (its "
                         f"\"nbformat\" is {doc.get('nbformat')!r}); open and save it in JupyterLab, which writes 4")
    cells = doc.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ValueError(f"{bad} (no list of cells: nbformat 4 keeps them under \"cells\")")
    if not any(isinstance(c.get("metadata"), dict) and "parameters" in (c["metadata"].get("tags") or [])
               for c in cells):
        raise ValueError(f"{where}: notebook {shown(path)} has no cell tagged 'parameters' (papermill puts the "
                         "stage's values after it); tag its parameters cell (JupyterLab: property inspector, "
                         "Cell Tags) or add \"tags\": [\"parameters\"] to that cell's metadata")
    return doc


@contextlib.contextmanager
def quiet_papermill() -> Iterator[None]:
    import logging

    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def notebook_parameters(path: str | os.PathLike, where: str = "pipeline") -> dict[str, dict]:
    """A notebook's parameters as papermill sees them: name -> {default, help, ...}; the notebook is
    checked first (`read_notebook`)."""
    import papermill

    read_notebook(path, where)
    try:
        with quiet_papermill():
            return papermill.inspect_notebook(str(path))
    except Exception as err:  # nbformat's errors on a notebook JSON it cannot take: the file's fault
        raise ValueError(f"{where}: notebook {shown(path)} is not a notebook papermill can read "
                         f"({type(err).__name__}: {err})") from None


@dataclass
class Outputs:
    """What a notebook writes into results.json, read statically: per kind, the names found and the
    expressions that could not be read (then a name not found may still be written)."""
    names: dict[str, set] = field(default_factory=lambda: {k: set() for k in OUTPUT_KINDS})
    unread: dict[str, list] = field(default_factory=lambda: {k: [] for k in OUTPUT_KINDS})


def _code(source: str) -> str:
    """A cell's source without IPython magics and shell lines (they are not Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _writer_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


@lru_cache(maxsize=64)
def _outputs(path: str, mtime: float) -> Outputs:
    out = Outputs()
    calls = []
    for index, cell in enumerate(read_notebook(path).get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        try:
            tree = ast.parse(_code("".join(map(str, source)) if isinstance(source, list) else str(source)))
        except SyntaxError as err:
            for kind in OUTPUT_KINDS:
                out.unread[kind].append(f"cell {index} does not parse as Python ({err.msg})")
            continue
        calls += [n for n in ast.walk(tree) if isinstance(n, ast.Call) and WRITER.fullmatch(_writer_name(n))]
    if not calls:
        for kind in OUTPUT_KINDS:
            out.unread[kind].append("no write_results(...) call")
    for call in calls:
        writer = _writer_name(call)
        given = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        if writer == "write_results":
            given.update({k: call.args[i] for k, i in POSITION.items() if i < len(call.args) and k not in given})
        spread = any(kw.arg is None for kw in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args)
        for kind in OUTPUT_KINDS:
            value = given.get(kind)
            if value is None:
                if writer != "write_results" or spread:
                    out.unread[kind].append(f"{writer}(...) writes them")
            elif not isinstance(value, ast.Dict):
                out.unread[kind].append(f"{kind}={ast.unparse(value)}")
            else:
                for key, item in zip(value.keys, value.values):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        out.names[kind].add(key.value)
                    else:
                        out.unread[kind].append(f"key {ast.unparse(key)}" if key is not None else
                                                f"**{ast.unparse(item)}")
    return out


def outputs(path: str | os.PathLike) -> Outputs:
    """The names a notebook writes into results.json (artifacts, metrics, params), read with ast."""
    path = Path(path).resolve()
    return _outputs(str(path), path.stat().st_mtime)
