"""Files that appear whole or not at all, and JSON read with one clear error.

Every writer in cllama goes through here: the content is written under a temporary name beside
the destination (`<stem>.partial-<pid><suffix>`, work folders `<name>.work-<pid>-*`) and renamed when
complete, so a kill never leaves a half-written file under its final name; a writer first removes
the temporaries of its destination that processes no longer alive left behind (`remove_stale`).
JSON is written strict (NaN and infinities become null). No MindSpore import.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name a file or folder is written under before it is renamed into place:
    `model.ckpt` -> `model.partial-<pid>.ckpt` (the suffix kept: MindSpore's writers add `.ckpt` to a
    name without it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial-{os.getpid()}{path.suffix}")


def work_prefix(path: str | os.PathLike) -> str:
    """The prefix of a work folder beside `path` (tempfile.TemporaryDirectory(prefix=...)): it names
    this process, so a later writer can tell a dead process's leftovers."""
    return f"{Path(path).name}.work-{os.getpid()}-"


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """A destination a command writes whole: refused when it exists and is not empty, unless
    `overwrite` (then the writer replaces it whole, atomically: write it through atomic_path)."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path}: exists and is not empty; choose a new destination or pass --overwrite "
                              "(overwrite=True in Python and notebooks; it is then replaced whole)")
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that id is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what writers of `path` that are no longer alive left beside it: `<stem>.partial-<pid>*`,
    `<name>.work-<pid>-*`, `<name>.old-<pid>`. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for pattern, marker in ((f"{path.stem}.partial-*", ".partial-"), (f"{path.name}.work-*", ".work-"),
                            (f"{path.name}.old-*", ".old-")):
        for leftover in path.parent.glob(pattern):
            pid = leftover.name.split(marker, 1)[1].split("-", 1)[0].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                _remove(leftover)
                removed.append(leftover)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(p) as tmp:` write the file (or folder) `tmp`; on success it is renamed to
    `p` (replacing it), on an exception it is removed and `p` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    install(tmp, path)


def install(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename a finished file or folder into place; an existing folder goes only after the new one
    is in place."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write text or bytes to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return Path(path)


def write_json(path: str | os.PathLike, doc: Any, indent: int | None = 2) -> Path:
    """Write a JSON document atomically (non-JSON values as their str)."""
    return atomic_write(path, dumps(doc, indent=indent) + "\n")


def strict(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(doc: Any, indent: int | None = 2) -> str:
    """Strict JSON text (non-finite numbers as null, other non-JSON values as their str)."""
    return json.dumps(strict(doc), indent=indent, default=str, ensure_ascii=False, allow_nan=False)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = "") -> Any:
    """A JSON document; a missing or invalid file is one error naming the path, what it should be and
    (when given) the fix."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; expected a {what}{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid {what} ({err}){hint}") from None


class AtomicWriter:
    """Base of the streaming writers (MindSpore .ckpt, safetensors): bytes go to `self.file`, opened
    on the temporary name; `close()` checks completeness (`_check_complete`) and renames, `abort()`
    removes. As a context manager an exception aborts, so nothing appears under `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        remove_stale(self.path)
        self.tmp = temp_path(self.path)
        self.file = open(self.tmp, "wb")

    def _check_complete(self) -> None:
        """Raise ValueError when the content is incomplete."""

    def close(self, rename: bool = True) -> Path:
        """Finish the file and rename it into place; with rename=False the caller renames
        `self.tmp` (e.g. after every shard of a sharded checkpoint is complete) and gets it back."""
        self._check_complete()
        self.file.close()
        if not rename:
            return self.tmp
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.file.closed:
            return
        if kind is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
