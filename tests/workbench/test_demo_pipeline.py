"""The real stage notebooks together: the demo pipeline (shrunk) end to end, the comparison notebook
on its ledger, and every notebook run with its own defaults as a JupyterLab user would."""
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from cllama.workbench import ledger, runner
from cllama.workbench import pipeline as runs
from cllama.workbench.results import read_results
from tests.conftest import ROOT

SHRUNK = {"prepare_code.max_files": 20, "prepare_code.seq_length": 64, "prepare_alpaca.seq_length": 128,
          "pretrain.steps": 6, "pretrain.batch_size": 2, "pretrain.eval_every": 3, "pretrain.save_steps": 3,
          "finetune.steps": 6, "finetune.batch_size": 2, "finetune.eval_every": 3, "finetune.save_steps": 3,
          "finetune_lora.steps": 4, "finetune_lora.batch_size": 2, "finetune_lora.eval_every": 2,
          "finetune_lora.save_steps": 2, "evaluate_lora.limit": 2, "evaluate_lora.max_new_tokens": 8,
          "generate_lora.max_new_tokens": 4,
          "evaluate.limit": 2, "evaluate.max_new_tokens": 8, "generate.max_new_tokens": 4,
          "export.seq_length": 64, "export.max_new_tokens": 4}


def _images(path: str) -> int:
    nb = nbformat.read(path, 4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    pipeline = runs.load_pipeline(ROOT / "configs" / "pipelines" / "demo.yaml", SHRUNK)
    return runner.run_pipeline(pipeline, root / "runs", cwd=root, progress=False)


@pytest.mark.slow
def test_demo_pipeline_runs_end_to_end(demo_run):
    failed = demo_run.failed_stage
    assert demo_run.status == "ok", f"{failed.name}: {failed.error}" if failed else demo_run.status
    resolved = json.loads((demo_run.run_dir / "params.json").read_text())
    pretrain, finetune = demo_run.results("pretrain"), demo_run.results("finetune")
    assert resolved["pretrain"]["data"] == demo_run.results("prepare_code")["artifacts"]["dataset"]
    assert resolved["finetune"]["model"] == pretrain["artifacts"]["checkpoint"]
    for stage in ("evaluate", "generate", "convert", "transform", "export"):
        assert resolved[stage]["model_dir" if stage != "convert" else "source_dir"] == \
            finetune["artifacts"]["checkpoint"], stage
    assert pretrain["metrics"]["steps"] == finetune["metrics"]["steps"] == 6
    lora = demo_run.results("finetune_lora")
    assert resolved["finetune_lora"]["model"] == pretrain["artifacts"]["checkpoint"]
    assert (Path(lora["artifacts"]["checkpoint"]) / "adapter.ckpt").is_file()
    for stage in ("evaluate_lora", "generate_lora"):
        assert resolved[stage]["model_dir"] == lora["artifacts"]["model_dir"] != lora["artifacts"]["checkpoint"]
    assert demo_run.results("evaluate_lora")["metrics"]["tasks"] == 2
    assert demo_run.results("evaluate")["metrics"]["tasks"] == 2
    assert demo_run.results("export")["metrics"]["tokens_equal"] == 1.0
    assert demo_run.results("transform")["metrics"]["verified"] == 1.0
    [row] = ledger.read_ledger_rows(demo_run.run_dir.parent)
    assert row["status"] == "ok" and float(row["final_loss"]) == pytest.approx(finetune["metrics"]["final_loss"])
    assert row["pass@1"] != "" and float(row["generate_tokens_per_s"]) > 0
    # the executed notebooks show the loss curves and the pass@1 chart inline
    by_name = {s.name: s for s in demo_run.stages}
    assert _images(by_name["pretrain"].executed) >= 1 and _images(by_name["finetune"].executed) >= 1
    assert _images(by_name["evaluate"].executed) >= 1
    assert all(Path(f).is_file() for s in demo_run.stages for f in s.results.get("figures", []))


@pytest.mark.slow
def test_compare_runs_notebook_reads_the_ledger(demo_run, tmp_path):
    assert demo_run.status == "ok"
    out = tmp_path / "compare"
    papermill.execute_notebook(str(ROOT / "notebooks" / "09_compare_runs.ipynb"), str(tmp_path / "09.ipynb"),
                               parameters={"runs_dir": str(demo_run.run_dir.parent), "runs": [demo_run.run_id],
                                           "output_dir": str(out)}, progress_bar=False, kernel_name="python3")
    results = read_results(out)
    # one loss curve per training stage: pretrain, finetune_lora, finetune
    assert results["metrics"] == {"runs": 1.0, "curves": 3.0, "flipped_tasks": 0.0}
    assert results["params"]["runs"] == [demo_run.run_id]
    assert Path(results["figures"][0]).is_file() and _images(str(tmp_path / "09.ipynb")) == 1
    assert demo_run.run_id in Path(results["artifacts"]["table"]).read_text().splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs_with_its_defaults(path, tmp_path):
    """What "Run All" does in JupyterLab: no injected parameters, a fresh working folder."""
    executed = tmp_path / path.name
    papermill.execute_notebook(str(path), str(executed), cwd=str(tmp_path), progress_bar=False, kernel_name="python3")
    [results_file] = (tmp_path / "papermill_runs").glob("*/results.json")
    results = json.loads(results_file.read_text())
    assert results["status"] == "ok" and results_file.parent.name == path.stem
