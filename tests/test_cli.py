import json
import subprocess
import sys

from cllama.cli import main


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
