"""HumanEval runs with a real Generator on a random tiny model: resumable samples, infilling, the
`eval humaneval` CLI and notebooks/06_evaluate_humaneval.ipynb."""
import json
import shutil
from pathlib import Path

import pytest

from cllama.cli import main
from cllama.evaluation import harness as evaluation
from cllama.generation.sampling import SamplingParams
from tests.conftest import run_notebook


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir(seq_length=1024)


@pytest.fixture(scope="module")
def generator(model_dir):
    from cllama.generation.generator import Generator

    return Generator.from_dir(model_dir)


class Counting:
    """Passes every call to the real generator and counts the prompts it was asked for."""

    def __init__(self, generator) -> None:
        self.generator, self.prompts = generator, 0

    def complete(self, prompts, *args, **kwargs):
        self.prompts += len(prompts)
        return self.generator.complete(prompts, *args, **kwargs)

    def infill_many(self, pairs, *args, **kwargs):
        self.prompts += len(pairs)
        return self.generator.infill_many(pairs, *args, **kwargs)


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, generator):
    tasks = evaluation.build_tasks(limit=3)
    options = dict(params=SamplingParams(max_new_tokens=6), batch_size=1, progress=False)
    full = evaluation.generate_samples(generator, tasks, tmp_path / "full" / "samples.jsonl", **options)
    lines = full.read_text().splitlines(keepends=True)
    assert [json.loads(line)["task_id"] for line in lines] == list(tasks)
    part = tmp_path / "part" / "samples.jsonl"  # killed while writing the second task
    part.parent.mkdir()
    part.write_text(lines[0] + lines[1][:12])
    shutil.copy(evaluation.settings_path(full), evaluation.settings_path(part))
    counting = Counting(generator)
    evaluation.generate_samples(counting, tasks, part, **options)
    # greedy runs decode fixed groups: the group holding the missing tasks is decoded again, whole
    assert counting.prompts == 3 and part.read_text() == full.read_text()
    evaluation.generate_samples(counting, tasks, part, **options)  # complete: nothing to do
    assert counting.prompts == 3
    with pytest.raises(ValueError, match="other settings"):
        evaluation.generate_samples(generator, tasks, part, **{**options, "params": SamplingParams(max_new_tokens=7)})


def test_sampling_is_seeded_per_task(tmp_path, generator):
    tasks = evaluation.build_tasks(limit=1)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=6, seed=3)
    options = dict(n_samples=3, params=params, progress=False)
    one = evaluation.generate_samples(generator, tasks, tmp_path / "1" / "samples.jsonl", **options)
    two = evaluation.generate_samples(generator, tasks, tmp_path / "2" / "samples.jsonl", batch_size=2, **options)
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    assert len(rows) == 3 and {r["task_id"] for r in rows} == {"HumanEval/0"}
    assert len({r["completion"] for r in rows}) > 1  # random weights at T=0.8: the samples differ
    other = evaluation.generate_samples(generator, tasks, tmp_path / "3" / "samples.jsonl",
                                        **{**options, "params": SamplingParams.build(params, seed=4)})
    assert one.read_text() == evaluation.generate_samples(generator, tasks, tmp_path / "4" / "samples.jsonl",
                                                          **options).read_text()
    assert one.read_text() != other.read_text() and two.exists()


def test_infilling_run_scores_every_task(tmp_path, generator):
    run = evaluation.evaluate(generator, tmp_path, limit=1, params=SamplingParams(max_new_tokens=4),
                              infilling="single-line", ks=(1,), sandbox_workers=1, progress=False)
    ids = [r["task_id"] for r in run["records"]]
    assert ids == [f"SingleLineInfilling/HumanEval/0/L{i}" for i in (0, 1, 2, 3, 4, 5, 7)]
    assert 0.0 <= run["metrics"]["pass@1"] <= 1.0 and run["metrics"]["tasks"] == 7
    table = evaluation.task_table(run["records"])
    assert list(table.columns) == ["task_id", "samples", "passed", "pass@1", "result"] and len(table) == 7


def test_cli_eval_humaneval_end_to_end(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert main(["eval", "humaneval", "--model", str(model_dir), "--limit", "2", "--max-new-tokens", "6",
                 "--k", "1", "--sandbox-workers", "1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tasks"] == 2 and 0.0 <= printed["pass@1"] <= 1.0
    assert printed["isolation"].endswith("rlimits")
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "evaluate_humaneval" and results["metrics"]["pass@1"] == printed["pass@1"]
    assert len((out / "samples.jsonl_results.jsonl").read_text().splitlines()) == 2
    assert main(["eval", "humaneval", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_notebook_runs_with_a_random_model(tmp_path):
    results = run_notebook("06_evaluate_humaneval.ipynb", tmp_path, limit=2, max_new_tokens=6, sandbox_workers=1)
    assert results["stage"] == "evaluate_humaneval" and results["status"] == "ok"
    assert 0.0 <= results["metrics"]["pass@1"] <= 1.0 and results["metrics"]["tasks"] == 2
    assert results["figures"] and all(Path(f).is_file() for f in results["figures"])
    assert "RANDOM tiny model" in (tmp_path / "06_evaluate_humaneval.ipynb").read_text()


def test_resuming_with_another_model_is_refused(tmp_path, model_dir, make_model_dir):
    out = tmp_path / "he"
    args = ["eval", "humaneval", "--limit", "1", "--max-new-tokens", "4", "--k", "1", "--sandbox-workers", "1",
            "--out", str(out)]
    assert main([*args, "--model", str(model_dir)]) == 0
    assert main([*args, "--model", str(model_dir)]) == 0  # the same model resumes (nothing left to do)
    other = make_model_dir(seed=9, seq_length=1024)  # same shapes, other weights
    assert main([*args, "--model", str(other)]) == 2
    settings = json.loads(evaluation.settings_path(out / "samples.jsonl").read_text())
    assert settings["model"]["weights"] == evaluation.model_identity(model_dir)["weights"]
    assert evaluation.model_identity(other)["weights"] != settings["model"]["weights"]
