"""notebooks/01_convert_weights.ipynb run headlessly with papermill, both directions."""
from pathlib import Path

from cllama.checkpoint.safetensors_file import SafetensorsFile
from tests.conftest import run_notebook


def test_notebook_converts_and_verifies_both_ways(tmp_path):
    first = run_notebook("01_convert_weights.ipynb", tmp_path / "a", random_layers=1)
    assert first["stage"] == "convert_weights" and first["status"] == "ok"
    assert first["metrics"]["mismatches"] == 0 and first["metrics"]["tensors"] == 3 + 9
    model_dir = Path(first["artifacts"]["model_dir"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.ckpt"]
    assert "RANDOM" in (tmp_path / "a" / "01_convert_weights.ipynb").read_text()  # it says the weights are random
    second = run_notebook("01_convert_weights.ipynb", tmp_path / "b", source_dir=str(model_dir), source_format="ms",
                          dtype="bfloat16")
    assert second["metrics"]["mismatches"] == 0 and second["params"]["dtype"] == "bfloat16"
    st = SafetensorsFile(Path(second["artifacts"]["model_dir"]) / "model.safetensors")
    assert {st.dtype(n) for n in st.keys()} == {"BF16"}
    assert len(Path(first["artifacts"]["tensor_table"]).read_text().splitlines()) == 1 + 12
