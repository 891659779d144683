"""notebooks/02_prepare_data.ipynb runs headlessly with shrunk parameters and writes results.json."""
import json
from pathlib import Path

import pytest

from cllama.data.mindrecord import read_mindrecord
from tests.conftest import run_notebook


@pytest.mark.parametrize("params", [
    {"kind": "qa", "seq_length": 128, "template": "inst", "val_fraction": 0.1},
    {"kind": "code", "seq_length": 64, "max_files": 8, "fim_rate": 0.9, "sample_index": 0},
])
def test_prepare_data_notebook(tmp_path, params):
    results = run_notebook("02_prepare_data.ipynb", tmp_path, **params)
    assert results["stage"] == "prepare_data" and results["status"] == "ok"
    assert all(Path(f).is_file() for f in results["figures"])
    stats = json.loads(Path(results["artifacts"]["stats"]).read_text())
    rows = read_mindrecord(results["artifacts"]["dataset"])
    assert rows["input_ids"].shape == (results["metrics"]["samples"], params["seq_length"] + 1)
    assert results["metrics"]["samples"] == stats["samples"] > 0 and results["metrics"]["val_samples"] > 0
    html = Path(results["artifacts"]["sample_html"]).read_text()
    executed = (tmp_path / "02_prepare_data.ipynb").read_text()
    if params["kind"] == "qa":
        assert sorted(rows) == ["input_ids", "labels"] and stats["template"] == "inst"
        assert "line-through" in html and "background:#d8f3dc" in html  # masked and trained spans marked
        assert "[INST]" in html and "line-through" in executed
    else:
        assert sorted(rows) == ["input_ids"] and stats["files"] == 8 and stats["fim_rate"] == 0.9
        assert results["artifacts"]["tokenizer"].endswith("tokenizer.model")
        assert "&lt;PRE&gt;" in html and "&lt;PRE&gt;" in executed
