"""Issue 17, model-side inputs: a garbage tokenizer, a device this host lacks, a config.json (cllama's, Hugging
Face's, Meta's params.json) of the wrong shape or types, non-UTF-8 or malformed data files, and destinations
that exist. Each is one line on stderr naming the file (or flag) and the field, exit 2, no traceback, nothing
written; `--overwrite` replaces a destination whole."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cllama.cli import main
from tests.conftest import ROOT

ALPACA = ROOT / "cllama" / "assets" / "code_alpaca_2k.json"
GARBAGE = bytes(range(256)) * 20  # not a protobuf, let alone a SentencePiece model


def one_line(capsys, code: int, *names) -> str:
    """The error line of a command that must have exited 2 naming each of `names`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def alpaca_subset(tmp_path) -> Path:
    path = tmp_path / "alpaca40.json"
    path.write_text(json.dumps(json.loads(ALPACA.read_text())[:40]))
    return path


@pytest.fixture
def garbage(tmp_path) -> Path:
    path = tmp_path / "garbage.model"
    path.write_bytes(GARBAGE)
    return path


# ---- 1. tokenizer files -----------------------------------------------------------------------------
@pytest.mark.parametrize("content", [GARBAGE, b"", b'{"version": "1.0", "model": {"type": "BPE"}}'])
def test_model_init_refuses_a_bad_tokenizer_before_writing(tmp_path, capsys, content):
    bad = tmp_path / "tok.model"
    bad.write_bytes(content)
    line = one_line(capsys, main(["model", "init", "--out", str(tmp_path / "m"), "--tokenizer", str(bad)]), bad)
    assert "not a" in line and "SentencePiece model" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kind", ["qa", "wiki", "code"])
def test_data_commands_refuse_a_garbage_tokenizer(tmp_path, capsys, garbage, alpaca_subset, kind):
    src = {"qa": alpaca_subset, "wiki": alpaca_subset, "code": Path(json.__file__)}[kind]
    dst = tmp_path / "out" / "d.mindrecord"
    code = main(["data", kind, "--src", str(src), "--dst", str(dst), "--seq-length", "64", "--tokenizer",
                 str(garbage), "--quiet", "--workers", "1"])
    assert "not a SentencePiece model" in one_line(capsys, code, garbage)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tokenizer_extend_and_generate_refuse_a_garbage_tokenizer(tmp_path, capsys, garbage, make_model_dir):
    assert "not a SentencePiece model" in one_line(
        capsys, main(["tokenizer", "extend", "--src", str(garbage), "--dst", str(tmp_path / "t.model")]), garbage)
    assert not (tmp_path / "t.model").exists()
    model = tmp_path / "model"
    shutil.copytree(make_model_dir(), model)
    (model / "tokenizer.model").write_bytes(GARBAGE)
    code = main(["generate", "--model", str(model), "--prompt", "def f():", "--max-new-tokens", "1"])
    assert "not a SentencePiece model" in one_line(capsys, code, model / "tokenizer.model")


# ---- 2. devices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["Ascend", "GPU", "TPU"])
def test_a_device_this_host_lacks_is_one_line(tmp_path, capsys, device):
    from cllama.runtime import DEVICES, device_problem

    if device in DEVICES and device_problem(device) is None:
        pytest.skip(f"this host has {device}")
    line = one_line(capsys, main(["model", "init", "--out", str(tmp_path / "m"), "--device", device]),
                    f"--device {device}")
    if device in DEVICES:
        assert "not available on this host" in line and "use --device CPU" in line
    else:
        assert "unknown device; choose one of CPU, Ascend, GPU" in line
    assert not (tmp_path / "m").exists()


def test_device_names_are_case_insensitive():
    from cllama.runtime import check_device

    assert check_device("cpu") == check_device("CPU") == "CPU"


# ---- 3. a model directory's config.json ---------------------------------------------------------------
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "seq_length": 128}
NOT_OBJECT = "config.json: must be a JSON object of ModelConfig keys"
FIELD = "config.json: ModelConfig."
BAD_CONFIGS = [
    ([], f"{NOT_OBJECT} (got a list)"),
    (None, f"{NOT_OBJECT} (got null)"),
    ("tiny", f"{NOT_OBJECT} (got a string)"),
    ({**TINY, "num_layers": "x"}, f"{FIELD}num_layers: must be an integer (got 'x')"),
    ({**TINY, "seq_length": None}, f"{FIELD}seq_length: must be an integer (got None)"),
    ({**TINY, "rms_norm_eps": "small"}, f"{FIELD}rms_norm_eps: must be a finite number (got 'small')"),
    ({**TINY, "use_past": "no"}, f"{FIELD}use_past: must be true/false (got 'no')"),
    ({**TINY, "intermediate_size": 1.5}, f"{FIELD}intermediate_size: must be an integer or null (got 1.5)"),
    ({**TINY, "compute_dtype": 16}, f"{FIELD}compute_dtype: must be a string (got 16)"),
    ({**TINY, "extra": []}, f"{FIELD}extra: must be an object (got [])"),
]


@pytest.mark.parametrize("content, message", BAD_CONFIGS)
def test_model_info_names_the_config_field(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(json.dumps(content))
    one_line(capsys, main(["model", "info", str(tmp_path)]), tmp_path / message)


@pytest.mark.parametrize("content, message", [BAD_CONFIGS[1], BAD_CONFIGS[3]])
def test_commands_loading_a_model_dir_name_the_config_field(tmp_path, capsys, make_model_dir, content, message):
    model = tmp_path / "model"
    shutil.copytree(make_model_dir(), model)
    (model / "config.json").write_text(json.dumps(content))
    one_line(capsys, main(["generate", "--model", str(model), "--prompt", "x"]), model / message)
    one_line(capsys, main(["ckpt", "strategy", "--model", str(model), "--out", str(tmp_path / "s.ckpt")]),
             model / message)
    assert not (tmp_path / "s.ckpt").exists()


# ---- 4. Hugging Face config.json and Meta params.json -----------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, make_model_dir) -> Path:
    from cllama.checkpoint.convert import ms_to_hf

    out = tmp_path_factory.mktemp("hf") / "hf"
    ms_to_hf(make_model_dir(), out, progress=False)
    return out


@pytest.mark.parametrize("field, value, message", [
    ("rope_scaling", "x", "rope_scaling: must be an object or null (got 'x')"),
    ("rope_scaling", {"type": 3, "factor": 2.0}, "rope_scaling.type: must be a string or null (got 3)"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "rope_scaling.factor: must be a finite number or null"),
    ("rope_parameters", [1], "rope_parameters: must be an object or null (got [1])"),
    ("hidden_size", "64", "hidden_size: must be an integer (got '64')"),
    ("eos_token_id", "</s>", "eos_token_id: must be a token id, a list of them, or null"),
    ("tie_word_embeddings", "false", "tie_word_embeddings: must be true/false or null"),
])
def test_hf_config_field_of_the_wrong_type_is_one_line(tmp_path, capsys, hf_dir, field, value, message):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, field: value}))
    code = main(["convert", "hf2ms", "--src", str(src), "--dst", str(tmp_path / "m"), "--no-progress"])
    one_line(capsys, code, f"{src / 'config.json'}: {message}")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("params, message", [
    ([], "must be a JSON object"),
    ({"dim": 64, "n_layers": "2", "n_heads": 4}, "n_layers: must be an integer (got '2')"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": None}, "norm_eps: must be a finite number (got None)"),
])
def test_meta_params_of_the_wrong_type_is_one_line(tmp_path, capsys, params, message):
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(params))
    code = main(["convert", "meta2ms", "--src", str(src), "--dst", str(tmp_path / "m"), "--no-progress"])
    one_line(capsys, code, f"{src / 'params.json'}: {message}")
    assert not (tmp_path / "m").exists()


# ---- 5. data files: not UTF-8, not JSON ---------------------------------------------------------------
@pytest.mark.parametrize("kind, name, content, where", [
    ("qa", "bad.json", b'[{"instruction": "a",\n "output": "b\xff"}]', "byte 35 (line 2)"),
    ("alpaca", "bad.json", b"ab\xff\xfe", "byte 2 (line 1)"),
    ("wiki", "wiki.raw", b" = T = \n\n a b c . \n\n d \xe9 e\n", "byte 23 (line 5)"),
    ("code", "bad.py", b"x = 1\n# caf\xe9\n", "byte 11 (line 2)"),
])
def test_non_utf8_data_file_names_the_file_byte_and_line(tmp_path, capsys, kind, name, content, where):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    argv = ["data", kind, "--src", str(src), "--dst", str(out / ("c.json" if kind == "alpaca" else "d.mindrecord"))]
    code = main(argv + ([] if kind == "alpaca" else ["--seq-length", "8", "--quiet", "--workers", "1"]))
    line = one_line(capsys, code, src, where, "is not UTF-8")
    assert "save it as UTF-8" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kind", ["qa", "alpaca"])
def test_invalid_json_data_file_names_the_file_and_line(tmp_path, capsys, kind):
    src = tmp_path / "broken.json"
    src.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ]\n')
    dst = tmp_path / ("c.json" if kind == "alpaca" else "d.mindrecord")
    code = main(["data", kind, "--src", str(src), "--dst", str(dst)] + ([] if kind == "alpaca" else
                                                                         ["--seq-length", "64", "--quiet"]))
    one_line(capsys, code, src, "malformed JSON at line 2 column 18")
    assert not dst.exists()


def test_non_utf8_error_offset_is_exact_across_read_chunks(tmp_path):
    from cllama.data.corpus import check_utf8

    head = b"x" + "é".encode() * ((1 << 20) // 2)  # a two-byte character straddles the 1 MiB chunk edge
    path = tmp_path / "big.raw"
    path.write_bytes(head + "ü\n".encode() * 3 + b"\xff tail")
    at = len(head) + 3 * 3
    with pytest.raises(ValueError) as err:
        check_utf8(path, "WikiText file")
    assert str(err.value) == (f"{path}: not a WikiText file: byte {at} (line 4) is not UTF-8 (b'\\xff'); "
                              "save it as UTF-8")
    path.write_bytes(head + "ü".encode()[:1])  # cut inside a character
    with pytest.raises(ValueError, match="big.raw: not a WikiText file: it ends inside a UTF-8 character"):
        check_utf8(path, "WikiText file")
    path.write_bytes(head)
    check_utf8(path, "WikiText file")


def test_source_tree_skips_non_utf8_files_and_counts_them(tmp_path, llama2_tokenizer_path):
    from cllama.data.prepare import prepare_code

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "good.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (tree / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    prepared = prepare_code(tree, tmp_path / "c.mindrecord", seq_length=16, tokenizer=llama2_tokenizer_path,
                            workers=1, progress=False)
    assert prepared.stats["layouts"] == {"plain": 1, "not_utf8": 1} and prepared.stats["dropped"] == 1


# ---- 6. destinations that exist -----------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_dataset_destination_is_refused_then_replaced_whole(tmp_path, capsys, alpaca_subset):
    out = tmp_path / "out"
    base = ["data", "qa", "--src", str(alpaca_subset), "--dst", str(out / "q.mindrecord"), "--seq-length", "128",
            "--quiet", "--workers", "1"]
    assert main(base + ["--shards", "3", "--val-fraction", "0.1"]) == 0
    capsys.readouterr()
    before = _files(out)
    assert sorted(before) == ["q.mindrecord0", "q.mindrecord0.db", "q.mindrecord1", "q.mindrecord1.db",
                              "q.mindrecord2", "q.mindrecord2.db", "q.stats.json", "q.val.mindrecord",
                              "q.val.mindrecord.db"]
    one_line(capsys, main(base), out / "q.mindrecord", "the dataset exists (q.mindrecord0", "--overwrite")
    assert _files(out) == before
    for leftover in ("q.mindrecord0", "q.mindrecord0.db", "q.stats.json"):  # any one file of it is enough
        (out / leftover).unlink()
    one_line(capsys, main(base), out / "q.mindrecord", "--overwrite")
    assert main(base + ["--overwrite"]) == 0  # one shard, no held-out set: nothing of the old run remains
    assert sorted(_files(out)) == ["q.mindrecord", "q.mindrecord.db", "q.stats.json"]


def test_a_dataset_cut_short_while_publishing_is_removed_by_the_next_run(tmp_path, capsys, alpaca_subset):
    """A dataset is several files (shards, indexes, held-out set, stats) renamed one by one; a writer killed
    among those renames leaves its marker, and the next run removes that incomplete dataset instead of
    refusing it as the user's (or reading it)."""
    out = tmp_path / "out"
    base = ["data", "qa", "--src", str(alpaca_subset), "--dst", str(out / "q.mindrecord"), "--seq-length", "128",
            "--quiet", "--workers", "1", "--shards", "2", "--val-fraction", "0.1"]
    assert main(base) == 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id no longer alive: the killed writer's
    (out / f"q.mindrecord.publishing-{gone.pid}").touch()
    (out / "q.stats.json").unlink()  # killed before its last rename
    assert main(base) == 0, capsys.readouterr().err
    assert sorted(_files(out)) == ["q.mindrecord0", "q.mindrecord0.db", "q.mindrecord1", "q.mindrecord1.db",
                                   "q.stats.json", "q.val.mindrecord", "q.val.mindrecord.db"]


def test_alpaca_and_tokenizer_destinations_are_refused_unless_overwrite(tmp_path, capsys, alpaca_subset):
    conv = tmp_path / "conv.json"
    conv.write_text("mine")
    one_line(capsys, main(["data", "alpaca", "--src", str(alpaca_subset), "--dst", str(conv)]), conv, "--overwrite")
    assert conv.read_text() == "mine"
    assert main(["data", "alpaca", "--src", str(alpaca_subset), "--dst", str(conv), "--overwrite"]) == 0
    assert len(json.loads(conv.read_text())) == 40
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"mine")
    one_line(capsys, main(["tokenizer", "extend", "--dst", str(tok)]), tok, "--overwrite")
    assert tok.read_bytes() == b"mine"
    assert main(["tokenizer", "extend", "--dst", str(tok), "--overwrite"]) == 0
    assert main(["tokenizer", "extend", "--dst", str(tok)]) == 0  # the same bytes again: nothing to lose
