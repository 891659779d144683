"""notebooks/01_convert_weights.ipynb run headlessly with papermill, both directions."""
import json
import os
from pathlib import Path

import papermill

from cllama.stfile import SafetensorsFile

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_convert_weights.ipynb"


def _run(tmp_path, name, **parameters):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / f"{name}.ipynb"), kernel_name="python3",
                               parameters={"output_dir": str(out), **parameters}, progress_bar=False)
    return json.loads((out / "results.json").read_text())


def test_notebook_converts_and_verifies_both_ways(tmp_path):
    first = _run(tmp_path, "hf2ms", random_layers=1)
    assert first["stage"] == "convert_weights" and first["status"] == "ok"
    assert first["metrics"]["mismatches"] == 0 and first["metrics"]["tensors"] == 3 + 9
    model_dir = Path(first["artifacts"]["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.ckpt"]
    assert "RANDOM" in (tmp_path / "hf2ms.ipynb").read_text()  # it says the weights are random
    second = _run(tmp_path, "ms2hf", source_dir=str(model_dir), source_format="ms", dtype="bfloat16")
    assert second["metrics"]["mismatches"] == 0 and second["params"]["dtype"] == "bfloat16"
    st = SafetensorsFile(Path(second["artifacts"]["hf_dir"]) / "model.safetensors")
    assert {st.dtype(n) for n in st.keys()} == {"BF16"}
    assert len(Path(first["artifacts"]["tensor_table"]).read_text().splitlines()) == 1 + 12
