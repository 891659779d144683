"""MindIR export: the reloaded prefill + incremental graphs generate what the model generates."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from cllama.checkpoint.model_dir import load_model_dir
from cllama.cli import main
from cllama.generation.export import DECODE_FILE, PREFILL_FILE, MindIREngine, compare_with_model
from cllama.generation.generator import Generator
from tests.conftest import run_notebook

BATCH, SEQ, WIDTH = 2, 48, 16


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir(seed=11, tokenizer=False, seq_length=64)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model_dir(model_dir)


@pytest.fixture(scope="module")
def cli_export(model_dir, tmp_path_factory):
    """`cllama export` once for the module: (exit code, printed report, output folder)."""
    out = tmp_path_factory.mktemp("export") / "mindir"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", "--model", str(model_dir), "--out", str(out), "--batch-size", str(BATCH),
                     "--seq-length", str(SEQ), "--prompt-length", str(WIDTH), "--check", "4"])
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
    assert manifest["prefill"]["inputs"] == {"input_ids": [BATCH, WIDTH], "pads": [BATCH]}
    assert manifest["decode"]["inputs"]["keys"] == [2, BATCH, 2, 16, SEQ]  # (layers, B, nkv, hd, L)
    assert manifest["decode"]["inputs"]["values"] == [2, BATCH, 2, SEQ, 16]  # (layers, B, nkv, L, hd)
    assert not list(out.parent.glob("*.partial*"))
    assert main(["export", "--model", str(model_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--out", str(out) + "2", "--seq-length", "65"]) == 2
    assert "seq_length=64" in capsys.readouterr().err


def test_mindir_greedy_equals_model(model, exported, prompts):
    """32 greedy tokens from the reloaded graphs == the engine's compiled steps in-framework, through the
    same Generator loop; the prefill logits are the full forward's at each prompt's last token."""
    result = compare_with_model(model, exported, prompts, 32)
    assert [len(t) for t in result["mindir_tokens"]] == [32, 32]
    assert result["mindir_tokens"] == result["model_tokens"] and result["tokens_equal"]
    assert result["prefill_max_abs_diff"] < 1e-4
    assert len({t for row in result["mindir_tokens"] for t in row}) > 8  # not a degenerate repeat


def test_one_prompt_in_a_batch_and_cache_end(exported, prompts):
    gen = Generator(MindIREngine(exported))
    prompt = [1, 5, 9]
    alone = gen.generate([prompt], max_new_tokens=SEQ - WIDTH, ignore_eos=True)[0].output_ids
    assert len(alone) == SEQ - WIDTH
    batched = gen.generate([prompt, prompts[1]], max_new_tokens=SEQ - WIDTH, ignore_eos=True)
    assert batched[0].output_ids == alone and len(batched[1].output_ids) == SEQ - WIDTH
    three = gen.generate([prompt] * 3, max_new_tokens=4, ignore_eos=True)  # more prompts than the batch: in turns
    assert [g.output_ids for g in three] == [alone[:4]] * 3
    with pytest.raises(ValueError, match="exceeds the exported prompt length 16"):
        gen.generate([list(range(3, 3 + WIDTH + 1))], max_new_tokens=4)
    with pytest.raises(ValueError, match=f"ask for at most {SEQ - WIDTH}"):
        gen.generate([prompt], max_new_tokens=SEQ - WIDTH + 1)


def test_notebook_08(tmp_path):
    """notebooks/08_export_mindir.ipynb headlessly (random tiny model, shrunk lengths)."""
    result = run_notebook("08_export_mindir.ipynb", tmp_path, seq_length=32, max_new_tokens=8)
    assert result["stage"] == "export_mindir" and result["metrics"]["tokens_equal"] == 1.0
    assert result["metrics"]["prefill_max_abs_diff"] < 1e-4
    assert Path(result["artifacts"]["decode_mindir"]).is_file()
    assert "RANDOM" in (tmp_path / "08_export_mindir.ipynb").read_text()
