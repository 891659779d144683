import json
import subprocess
import sys

import pytest

from cllama.cli import main
from tests.conftest import ROOT


def test_tokenizer_extend(tmp_path, capsys):
    assert main(["tokenizer", "extend", "--dst", str(tmp_path / "t.model")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vocab_size"] == 32016 and out["eot_id"] == 32010


def test_model_init_and_info(tmp_path, capsys):
    assert main(["model", "init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--set", "seq_length=256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["random_weights"] is True
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.ckpt", "tokenizer.model"]
    assert main(["model", "info", str(tmp_path / "m")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["seq_length"] == 256 and info["params"] == out["params"]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["model", "init", "--out", str(tmp_path), "--set", "num_heads=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cllama model: error:") and "hidden_size" in err


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "cllama", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("cllama ")


PRETRAIN_YAML = "configs/tiny/pretrain.yaml"
BAD_ARGUMENTS = [  # (command line, what the one error line must name)
    (["ckpt", "strategy", "--preset", "tiny", "--out", "{tmp}/s.ckpt", "--mp", "0"], "--mp 0: must be >= 1"),
    (["ckpt", "strategy", "--preset", "tiny", "--out", "{tmp}/s.ckpt", "--dp", "0"], "--dp 0: must be >= 1"),
    (["ckpt", "strategy", "--preset", "tiny", "--out", "{tmp}/s.ckpt", "--pp", "-1"], "--pp -1: must be >= 1"),
    (["ckpt", "transform", "--src", "{tmp}", "--dst", "{tmp}/d", "--mp", "0"], "--mp 0: must be >= 1"),
    (["ckpt", "transform", "--src", "{tmp}", "--dst", "{tmp}/d", "--dp", "0"], "--dp 0: must be >= 1"),
    (["ckpt", "transform", "--src", "{tmp}", "--dst", "{tmp}/d", "--pp", "0"], "--pp 0: must be >= 1"),
    (["ckpt", "transform", "--src", "{tmp}", "--dst", "{tmp}/d", "--rank", "-1"], "--rank -1: must be >= 0"),
    (["data", "code", "--src", "{tmp}", "--dst", "{tmp}/c.mindrecord", "--seq-length", "0"], "--seq-length 0"),
    (["data", "wiki", "--src", "{tmp}", "--dst", "{tmp}/w.mindrecord", "--seq-length", "64", "--shards", "1001"],
     "--shards 1001: must be in [1, 1000]"),
    (["data", "qa", "--src", "{tmp}", "--dst", "{tmp}/q.mindrecord", "--seq-length", "64", "--shards", "0"],
     "--shards 0: must be in [1, 1000]"),
    (["data", "code", "--src", "{tmp}", "--dst", "{tmp}/c.mindrecord", "--seq-length", "64", "--workers", "0"],
     "--workers 0: must be >= 1"),
    (["data", "code", "--src", "{tmp}", "--dst", "{tmp}/c.mindrecord", "--seq-length", "64", "--val-fraction", "1"],
     "--val-fraction 1.0: must be in [0, 1)"),
    (["data", "code", "--src", "{tmp}", "--dst", "{tmp}/c.mindrecord", "--seq-length", "64", "--fim-rate", "1.5"],
     "--fim-rate 1.5: must be in [0.0, 1.0]"),
    (["data", "code", "--src", "{tmp}", "--dst", "{tmp}/c.mindrecord", "--seq-length", "64", "--max-files", "0"],
     "--max-files 0: must be >= 1"),
    (["train", "--config", PRETRAIN_YAML, "--workers", "0"], "--workers 0: must be >= 1"),
    (["train", "--config", PRETRAIN_YAML, "--check", "--devices-per-node", "0"], "--devices-per-node 0"),
    (["train", "--config", PRETRAIN_YAML, "--check", "--set", "runner_config.batchsize=4"],
     "did you mean 'batch_size'"),
    (["train", "--config", PRETRAIN_YAML, "--check", "--set", "lr_schedule.learning_rate=NaN"],
     "lr_schedule.learning_rate: must be a finite number"),
    (["train", "--config", PRETRAIN_YAML, "--check", "--set", "lr_schedule.learning_rate=-0.001"],
     "lr_schedule.learning_rate: must be >= 0"),
    (["model", "init", "--out", "{tmp}/m", "--seed", "-1"], "--seed -1: must be >= 0"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a[:2]) + " " + m for a, m in BAD_ARGUMENTS])
def test_out_of_range_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err and message in lines[0], captured.err
    assert lines[0].startswith(f"cllama {argv[0]}: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before anything is written


def test_model_init_refuses_a_used_directory_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["model", "init", "--out", str(out)]) == 0
    (out / "optimizer.ckpt").write_text("state of a trained model")
    assert main(["model", "init", "--out", str(out), "--seed", "1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "optimizer.ckpt").is_file()
    assert main(["model", "init", "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.ckpt", "tokenizer.model"]
