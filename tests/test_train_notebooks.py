"""03_pretrain and 04_finetune run headlessly with shrunk parameters and write their results.json."""
from pathlib import Path

import pytest

from cllama.results import read_results
from cllama.weights import load_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _execute(name: str, tmp_path: Path, **parameters) -> dict:
    import papermill

    out = tmp_path / "out"
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(tmp_path / name), kernel_name="python3",
                               parameters={"output_dir": str(out), **parameters}, cwd=str(ROOT / "notebooks"),
                               progress_bar=False)
    return read_results(out)


@pytest.mark.parametrize("name, parameters", [
    ("03_pretrain.ipynb", dict(max_files=3, seq_length=64, steps=12, batch_size=4, eval_every=6, save_steps=6)),
    ("04_finetune.ipynb", dict(max_examples=80, seq_length=128, steps=12, batch_size=2, eval_every=6,
                               save_steps=6)),
])
def test_training_notebook(name, parameters, tmp_path):
    results = _execute(name, tmp_path, **parameters)
    assert results["status"] == "ok" and results["stage"] in ("pretrain", "finetune")
    metrics = results["metrics"]
    assert metrics["steps"] == 12 and metrics["tokens_per_s"] > 0 and metrics["val_loss"] > 0
    assert metrics["final_loss"] < metrics["first_loss"]
    checkpoint = Path(results["artifacts"]["checkpoint"])
    assert checkpoint.name == "step_12" and load_model_dir(checkpoint).config.hidden_size == 64
    assert all(Path(f).is_file() for f in results["figures"])
    assert results["params"]["steps"] == 12
