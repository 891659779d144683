"""Bad inputs x commands: every `cllama` command given a damaged, missing or mistyped input exits 2
with one line on stderr that names the input, writes nothing, and prints no traceback.

Each input is built fresh in the test's folder; each command line names where the input goes with
`{bad}` (and `{out}` for the destination that must not appear). The table is the product of the
commands that read a kind of input and the bad forms of that kind."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cllama.cli import main

# ---- bad inputs, by kind ------------------------------------------------------------------------
GARBAGE = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
NOT_UTF8 = b'{"instruction": "caf\xe9", "output": "\xff\xfe"}\n'


def _file(content: bytes):
    def make(path, model_dir):
        path.write_bytes(content)
        return path
    return make


def _missing(path, model_dir):
    return path


def _empty_dir(path, model_dir):
    path.mkdir()
    return path


def _model_with(name: str, content: bytes | None):
    """A copy of a valid tiny model directory with one file replaced (content None: removed;
    a negative-length slice of the original for a truncated file)."""
    def make(path, model_dir):
        shutil.copytree(model_dir, path)
        target = path / name
        if content is None:
            target.unlink()
        elif content == b"TRUNCATE":
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 3])
        else:
            target.write_bytes(content)
        return path
    return make


FILES = {  # a file the command reads (data, a config, samples, a tokenizer)
    "missing": _missing,
    "empty": _file(b""),
    "garbage": _file(GARBAGE),
    "not-utf8": _file(NOT_UTF8),
    "json-null": _file(b"null\n"),
    "a-directory": _empty_dir,
}
MODEL_DIRS = {  # a model directory the command loads
    "missing": _missing,
    "empty-dir": _empty_dir,
    "a-file": _file(b"{}"),
    "config-list": _model_with("config.json", b"[]"),
    "config-null": _model_with("config.json", b"null"),
    "config-not-json": _model_with("config.json", b"{'num_layers': 2,"),
    "config-bad-field": _model_with("config.json", json.dumps({"num_layers": "two"}).encode()),
    "config-not-utf8": _model_with("config.json", NOT_UTF8),
    "weights-truncated": _model_with("model.ckpt", b"TRUNCATE"),
    "weights-garbage": _model_with("model.ckpt", GARBAGE),
    "weights-missing": _model_with("model.ckpt", None),
    "tokenizer-garbage": _model_with("tokenizer.model", GARBAGE),
}
TOKENIZERS = {"missing": _missing, "empty": _file(b""), "garbage": _file(GARBAGE), "a-directory": _empty_dir}

# ---- commands, by the kind of input they read ---------------------------------------------------
FILE_COMMANDS = [
    ["data", "qa", "--src", "{bad}", "--dst", "{out}", "--seq-length", "64"],
    ["data", "wiki", "--src", "{bad}", "--dst", "{out}", "--seq-length", "64"],
    ["data", "alpaca", "--src", "{bad}", "--dst", "{out}"],
    ["train", "--config", "{bad}", "--check", "--output-dir", "{out}"],
    ["eval", "score", "{bad}"],
    ["eval", "diff", "{bad}", "{bad}"],
    ["eval", "mbpp", "--data", "{bad}", "--model", "{model}", "--out", "{out}"],
    ["run", "{bad}", "--check", "--runs-dir", "{out}"],
]
MODEL_COMMANDS = [
    ["model", "info", "{bad}"],
    ["generate", "--model", "{bad}", "--prompt", "def f():", "--max-new-tokens", "2"],
    ["eval", "humaneval", "--model", "{bad}", "--limit", "1", "--out", "{out}"],
    ["export", "--model", "{bad}", "--out", "{out}"],
    ["convert", "ms2hf", "--src", "{bad}", "--dst", "{out}"],
    ["ckpt", "transform", "--src", "{bad}", "--dst", "{out}", "--mp", "2"],
    ["ckpt", "strategy", "--model", "{bad}", "--out", "{out}", "--mp", "2"],
    ["lora", "merge", "--base", "{bad}", "--adapter", "{bad}", "--dst", "{out}"],
]
TOKENIZER_COMMANDS = [
    ["model", "init", "--out", "{out}", "--tokenizer", "{bad}"],
    ["tokenizer", "extend", "--src", "{bad}", "--dst", "{out}"],
    ["data", "qa", "--src", "{data}", "--dst", "{out}", "--seq-length", "64", "--tokenizer", "{bad}"],
]
# Inputs a command reads that are not a named file: one line each, nothing written.
OTHER_CASES = [
    (["model", "init", "--out", "{out}", "--device", "Ascend"], "--device Ascend"),
    (["model", "init", "--out", "{out}", "--device", "GPU"], "--device GPU"),
    (["model", "init", "--out", "{out}", "--device", "TPU"], "--device TPU"),
    (["ckpt", "transform", "--src", "{model}", "--dst", "{out}", "--mp", "2", "--rank", "5"], "--rank 5"),
    (["train", "--config", "configs/tiny/pretrain.yaml", "--check", "--output-dir", "{out}",
      "--set", "runner_config=5"], "runner_config"),
    (["plan", "--preset", "codellama-35b", "--devices", "8"], "codellama-35b"),
    (["run", "demo", "--check", "--runs-dir", "{out}", "--set", "pretrain.nosuch=1"], "nosuch"),
]


def _cases():
    for table, inputs in ((FILE_COMMANDS, FILES), (MODEL_COMMANDS, MODEL_DIRS), (TOKENIZER_COMMANDS, TOKENIZERS)):
        for argv in table:
            for name, make in inputs.items():
                yield pytest.param(argv, make, id=f"{' '.join(argv[:2])} <- {name}")


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir()


def _run(argv, tmp_path, model_dir, capfd, monkeypatch, bad=None):
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    args = [a.replace("{bad}", str(bad)).replace("{out}", str(out)).replace("{model}", str(model_dir))
            .replace("{data}", str(data)) for a in argv]
    code = main(args)
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err, captured.err
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n{captured.err}"
    assert lines[0].startswith(f"cllama {argv[0]}: error: "), lines[0]
    assert not out.exists(), f"{out} was written"
    return lines[0]


@pytest.mark.parametrize("argv, make", list(_cases()))
def test_bad_input_is_one_line_exit_2(argv, make, tmp_path, model_dir, capfd, monkeypatch):
    bad = make(tmp_path / "bad", model_dir)
    line = _run(argv, tmp_path, model_dir, capfd, monkeypatch, bad)
    assert str(bad) in line, f"the error does not name {bad}: {line}"
    assert ".partial-" not in line and ".work-" not in line, line


@pytest.mark.parametrize("argv, message", OTHER_CASES, ids=[" ".join(a[:2]) + " " + m for a, m in OTHER_CASES])
def test_bad_argument_is_one_line_exit_2(argv, message, tmp_path, model_dir, capfd, monkeypatch):
    line = _run(argv, tmp_path, model_dir, capfd, monkeypatch)
    assert message in line, line
