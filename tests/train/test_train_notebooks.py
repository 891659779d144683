"""03_pretrain and 04_finetune run headlessly with shrunk parameters and write their results.json."""
from pathlib import Path

import pytest

from cllama.checkpoint.model_dir import load_model_dir
from tests.conftest import ROOT, run_notebook


@pytest.mark.parametrize("name, parameters", [
    ("03_pretrain.ipynb", dict(max_files=3, seq_length=64, steps=12, batch_size=4, eval_every=6, save_steps=6)),
    ("04_finetune.ipynb", dict(max_examples=80, seq_length=128, steps=12, batch_size=2, eval_every=6,
                               save_steps=6)),
])
def test_training_notebook(name, parameters, tmp_path):
    results = run_notebook(name, tmp_path, cwd=ROOT / "notebooks", **parameters)
    assert results["status"] == "ok" and results["stage"] in ("pretrain", "finetune")
    metrics = results["metrics"]
    assert metrics["steps"] == 12 and metrics["tokens_per_s"] > 0 and metrics["val_loss"] > 0
    assert metrics["final_loss"] < metrics["first_loss"]
    checkpoint = Path(results["artifacts"]["checkpoint"])
    assert checkpoint.name == "step_12" and load_model_dir(checkpoint).config.hidden_size == 64
    assert all(Path(f).is_file() for f in results["figures"])
    assert results["params"]["steps"] == 12


def test_finetune_notebook_with_lora(tmp_path):
    """peft="lora": the checkpoint is an adapter directory, model_dir the base with it merged in."""
    results = run_notebook("04_finetune.ipynb", tmp_path, cwd=ROOT / "notebooks", peft="lora", lora_rank=4,
                           lora_targets=".*wq|.*wv|.*w2", learning_rate=0.01, max_examples=40, seq_length=128,
                           steps=6, batch_size=2, eval_every=3, save_steps=3)
    assert results["status"] == "ok" and results["params"]["peft"] == "lora"
    checkpoint, merged = Path(results["artifacts"]["checkpoint"]), Path(results["artifacts"]["model_dir"])
    assert (checkpoint / "adapter.ckpt").is_file() and not (checkpoint / "model.ckpt").exists()
    assert merged.name == "merged_model" and load_model_dir(merged).config.hidden_size == 64
    assert results["metrics"]["steps"] == 6 and results["metrics"]["val_loss"] > 0
