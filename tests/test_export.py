"""MindIR export: the reloaded prefill + incremental graphs generate what the model generates."""
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from cllama.cli import main
from cllama.config import ModelConfig
from cllama.export import DECODE_FILE, PREFILL_FILE, MindIRGenerator, compare_with_model
from cllama.weights import load_model_dir, random_model, save_model_dir

BATCH, SEQ = 2, 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(random_model(ModelConfig.from_name("tiny", seq_length=64), seed=11),
                          tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model_dir(model_dir)


@pytest.fixture(scope="module")
def cli_export(model_dir):
    """`cllama export` once for the module: (exit code, printed report, output folder)."""
    out = model_dir.parent / "mindir"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", "--model", str(model_dir), "--out", str(out), "--batch-size", str(BATCH),
                     "--seq-length", str(SEQ), "--check", "4"])
    return code, json.loads(printed.getvalue()), out


@pytest.fixture(scope="module")
def exported(cli_export):
    return cli_export[2]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [list(rng.integers(3, 32016, 5)), list(rng.integers(3, 32016, 11))]


def test_cli_export_layout_and_manifest(cli_export, model_dir, capsys):
    code, report, out = cli_export
    assert code == 0 and report["prefill"] == str(out / PREFILL_FILE) and report["seq_length"] == SEQ
    assert report["tokens_equal"] is True and report["prefill_max_abs_diff"] < 1e-5
    assert (out / PREFILL_FILE).is_file() and (out / DECODE_FILE).is_file() and (out / "config.json").is_file()
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["prefill"]["inputs"] == {"input_ids": [BATCH, SEQ], "last_index": [BATCH]}
    assert manifest["decode"]["inputs"]["keys"] == [2, BATCH, 2, SEQ, 16]  # (layers, B, nkv, S, hd)
    assert not list(out.parent.glob("*.partial*"))
    assert main(["export", "--model", str(model_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--out", str(out) + "2", "--seq-length", "65"]) == 2
    assert "seq_length=64" in capsys.readouterr().err


def test_mindir_greedy_equals_model(model, exported, prompts):
    """32 greedy tokens from the reloaded graphs == compiled PrefillStep/DecodeStep in-framework."""
    result = compare_with_model(model, exported, prompts, 32)
    assert [len(t) for t in result["mindir_tokens"]] == [32, 32]
    assert result["mindir_tokens"] == result["model_tokens"] and result["tokens_equal"]
    assert result["prefill_max_abs_diff"] < 1e-5
    assert len({t for row in result["mindir_tokens"] for t in row}) > 8  # not a degenerate repeat
    # the prefill logits are also the full forward's at each prompt's last token
    gen = MindIRGenerator(exported)
    ids, lengths = gen.pad(prompts)
    logits = gen.prefill(ids, lengths - 1)[0]
    full = model(Tensor(ids)).asnumpy()
    assert np.abs(logits - full[np.arange(BATCH), lengths - 1]).max() < 1e-4


def test_one_prompt_in_a_batch_and_cache_end(exported, prompts):
    gen = MindIRGenerator(exported)
    prompt = [1, 5, 9]
    alone = gen.generate([prompt], 100, stop_at_eos=False)[0]
    assert len(alone) == SEQ - len(prompt) + 1  # the cache holds SEQ positions; the last token is emitted
    batched = gen.generate([prompt, prompts[1]], 100, stop_at_eos=False)
    assert batched[0] == alone and len(batched[1]) == SEQ - len(prompts[1]) + 1
    with pytest.raises(ValueError, match="1..2 prompts"):
        gen.generate([prompt] * 3, 4)
    with pytest.raises(ValueError, match="holds 1..47"):
        gen.generate([list(range(3, 3 + SEQ))], 4)


def test_notebook_08(tmp_path):
    """notebooks/08_export_mindir.ipynb headlessly (random tiny model, shrunk lengths)."""
    import papermill

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "08_export_mindir.ipynb"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(notebook.parents[1]), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    papermill.execute_notebook(str(notebook), str(tmp_path / "run.ipynb"), kernel_name="python3", progress_bar=False,
                               parameters={"output_dir": str(out), "seq_length": 32, "max_new_tokens": 8})
    result = json.loads((out / "results.json").read_text())
    assert result["stage"] == "export_mindir" and result["metrics"]["tokens_equal"] == 1.0
    assert result["metrics"]["prefill_max_abs_diff"] < 1e-5
    assert Path(result["artifacts"]["decode_mindir"]).is_file()
    assert "RANDOM" in (tmp_path / "run.ipynb").read_text()
