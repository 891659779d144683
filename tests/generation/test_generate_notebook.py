"""notebooks/07_generate.ipynb runs headless under papermill and writes results.json + samples."""
import json
from pathlib import Path

from tests.conftest import run_notebook


def test_generate_notebook_runs_under_papermill(tmp_path):
    prompts = ["def add(a, b):\n    ", "def sub(a, b):\n    "]
    results = run_notebook("07_generate.ipynb", tmp_path, mode="infill", prompts=prompts, max_new_tokens=6)
    assert results["stage"] == "generate" and results["status"] == "ok" and results["metrics"]["prompts"] == 2
    assert results["metrics"]["tokens_per_s"] > 0 and 0 < results["metrics"]["new_tokens"] <= 12
    samples = json.loads(Path(results["artifacts"]["samples"]).read_text())
    assert [s["prompt"] for s in samples] == prompts
    assert all(s["prompt_ids"][:2] == [1, 32007] and s["prompt_ids"][-1] == 32009 for s in samples)
    assert "RANDOM tiny model" in (tmp_path / "07_generate.ipynb").read_text()  # it says the weights are random
