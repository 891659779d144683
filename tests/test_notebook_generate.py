"""notebooks/07_generate.ipynb runs headless under papermill and writes results.json + samples."""
import json
import os
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]


def test_generate_notebook_runs_under_papermill(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "07_generate.ipynb"), str(tmp_path / "executed.ipynb"),
        kernel_name="python3", cwd=str(ROOT), progress_bar=False,
        parameters={"mode": "infill", "prompts": ["def add(a, b):\n    ", "def sub(a, b):\n    "],
                    "max_new_tokens": 6, "output_dir": str(out)})
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "generate" and results["status"] == "ok"
    assert results["params"]["random_weights"] is True and results["metrics"]["prompts"] == 2
    assert results["metrics"]["tokens_per_s"] > 0 and 0 < results["metrics"]["new_tokens"] <= 12
    samples = json.loads(Path(results["artifacts"]["samples"]).read_text())
    assert [s["prompt"] for s in samples] == ["def add(a, b):\n    ", "def sub(a, b):\n    "]
    assert all(s["prompt_ids"][:2] == [1, 32007] and s["prompt_ids"][-1] == 32009 for s in samples)
    executed = (tmp_path / "executed.ipynb").read_text()
    assert "RANDOM tiny model" in executed
