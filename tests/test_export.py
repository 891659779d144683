"""MindIR export: the reloaded prefill + incremental graphs generate what the model generates."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from cllama.cli import main
from cllama.config import ModelConfig
from cllama.export import DECODE_FILE, PREFILL_FILE, MindIRGenerator, compare_with_model, export_mindir
from cllama.weights import random_model, save_model_dir

BATCH, SEQ = 2, 48


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_name("tiny", seq_length=64), seed=11)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_mindir(model, tmp_path_factory.mktemp("export") / "mindir", BATCH, SEQ)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [list(rng.integers(3, 32016, 5)), list(rng.integers(3, 32016, 11))]


def test_layout_and_manifest(exported):
    assert (exported / PREFILL_FILE).is_file() and (exported / DECODE_FILE).is_file()
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["prefill"]["inputs"] == {"input_ids": [BATCH, SEQ], "last_index": [BATCH]}
    assert manifest["decode"]["inputs"]["keys"] == [2, BATCH, 2, SEQ, 16]
    assert not list(exported.parent.glob("*.partial*"))


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


def test_cli_export(tmp_path, capsys):
    model = random_model(ModelConfig.from_name("tiny", seq_length=32), seed=2)
    save_model_dir(model, tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_length"] == 32 and report["batch_size"] == 1 and "tokens_equal" not in report
    assert (tmp_path / "out" / PREFILL_FILE).is_file() and (tmp_path / "out" / "config.json").is_file()
    assert len(MindIRGenerator(tmp_path / "out").generate([[1, 2]], 3, stop_at_eos=False)[0]) == 3
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
