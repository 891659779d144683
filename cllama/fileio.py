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
from collections.abc import Iterator, Mapping
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


def publishing(path: str | os.PathLike, done: bool = False) -> None:
    """Mark (then, with done=True, unmark) the renames that publish a group of files that cannot
    appear in one rename (a dataset's shards, indexes, held-out set and stats): the marker
    `<name>.publishing-<pid>` beside `path` lets a later writer tell a group cut short (`interrupted`)."""
    marker = Path(path).with_name(f"{Path(path).name}.publishing-{os.getpid()}")
    if done:
        marker.unlink(missing_ok=True)
    else:
        marker.touch()


def interrupted(path: str | os.PathLike) -> bool:
    """Whether a writer that is gone (or this process, after an error) was cut short publishing the
    group of `path` (see `publishing`); its markers are removed, the caller removes the group."""
    path = Path(path)
    found = False
    for marker in path.parent.glob(f"{path.name}.publishing-*") if path.parent.is_dir() else ():
        pid = marker.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            marker.unlink(missing_ok=True)
            found = True
    return found


def _remove(path: Path) -> None:
    """Best effort: what cannot be removed (or named) stays; the write that follows reports it."""
    with contextlib.suppress(OSError):
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
    with final_names({tmp: path}, writing=path):
        _remove(tmp)
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        install(tmp, path)


def _forms(path: Path) -> list[str]:
    """The ways a message may spell a path: as given, absolute, resolved."""
    return [str(path), os.path.abspath(path), str(path.resolve())]


def with_final_names(err: BaseException, names: Mapping[str | os.PathLike, str | os.PathLike],
                     writing: str | os.PathLike | None = None) -> BaseException | None:
    """`err` rebuilt (same type) with each temporary path of `names` ({temporary: final}) in its message
    replaced by the final one, and an OSError naming no file (a full disk: "[Errno 28] No space left on
    device") told what was being written (`writing`); None when there is nothing to change or the type
    cannot be rebuilt."""
    pairs = sorted({(a, b) for tmp, final in names.items() for a, b in zip(_forms(Path(tmp)), _forms(Path(final)))},
                   key=lambda pair: -len(pair[0]))

    def sub(value):
        if not isinstance(value, (str, os.PathLike)):
            return value
        text = os.fspath(value)
        for a, b in pairs:
            text = text.replace(a, b)
        return text

    is_os = isinstance(err, OSError) and err.errno is not None and err.strerror is not None
    unnamed = is_os and err.filename is None and writing is not None and "(while writing " not in err.strerror
    if not unnamed and not any(a in str(err) for a, _ in pairs):
        return None
    try:
        if is_os:
            strerror = sub(err.strerror) + (f" (while writing {writing})" if unnamed else "")
            new = type(err)(err.errno, strerror, *([sub(err.filename)] if err.filename is not None else []),
                            *([None, sub(err.filename2)] if err.filename2 is not None else []))
        else:
            new = type(err)(*(sub(a) for a in err.args))
    except Exception:
        return None
    return new if not any(a in str(new) for a, _ in pairs) else None


@contextlib.contextmanager
def final_names(names: Mapping[str | os.PathLike, str | os.PathLike],
                writing: str | os.PathLike | None = None) -> Iterator[None]:
    """`with final_names({tmp: final}, writing=final):` an exception whose message names a temporary
    path is raised again (same type, same traceback) naming the final path instead, and an OSError that
    names no file says it happened while writing `writing`: errors name the user's paths."""
    try:
        yield
    except Exception as err:
        new = with_final_names(err, names, writing)
        if new is None:
            raise
        raise new.with_traceback(err.__traceback__) from None


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


def read_text(path: str | os.PathLike, what: str = "UTF-8 text file", fix: str = "") -> str:
    """A UTF-8 text file; a missing file, a folder or undecodable bytes are one error naming the path,
    what it should be, where the bad byte is and (when given) the fix."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; expected a {what}{hint}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder; expected a {what}{hint}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: not a {what}: byte {err.start} (line {line}) is not UTF-8 "
                         f"({data[err.start:err.start + 1]!r}); save it as UTF-8{hint}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = "") -> Any:
    """A JSON document; a missing or invalid file is one error naming the path, what it should be and
    (when given) the fix."""
    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid {what} ({err}){'; ' + fix if fix else ''}") from None


def read_jsonl(path: str | os.PathLike, what: str = "JSON-lines file", fix: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file, streamed; a missing file, a
    line that is not UTF-8 or not JSON is one error naming the path and line."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'is a folder' if path.is_dir() else 'missing'}; expected a {what}{hint}")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 (byte {err.start} of the line, "
                                 f"{raw[err.start:err.start + 1]!r}); save the {what} as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg}); expected a {what}{hint}") from None
            yield number, value


def read_yaml(path: str | os.PathLike, what: str = "YAML file", fix: str = "") -> Any:
    """A YAML document (safe_load), with the same one-line errors as read_json."""
    import yaml

    text = read_text(path, what, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f"line {where.line + 1}, column {where.column + 1}: " if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: not a valid {what} ({at}{problem}){'; ' + fix if fix else ''}") from None


class AtomicWriter:
    """Base of the streaming writers (MindSpore .ckpt, safetensors): bytes go to `self.file`, opened
    on the temporary name; `close()` checks completeness (`_check_complete`) and renames, `abort()`
    removes. As a context manager an exception aborts, so nothing appears under `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        remove_stale(self.path)
        self.tmp = temp_path(self.path)
        with final_names({self.tmp: self.path}):
            self.file = open(self.tmp, "wb")

    def _check_complete(self) -> None:
        """Raise ValueError when the content is incomplete."""

    def close(self, rename: bool = True) -> Path:
        """Finish the file and rename it into place; with rename=False the caller renames
        `self.tmp` (e.g. after every shard of a sharded checkpoint is complete) and gets it back."""
        self._check_complete()
        with final_names({self.tmp: self.path}):
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
