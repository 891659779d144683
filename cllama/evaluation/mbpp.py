"""MBPP as Code Llama's paper runs it (Austin et al. 2021, "Program Synthesis with Large Language
Models"): Google's original release `mbpp.jsonl` (974 tasks, one JSON object per line with task_id,
text, code, test_list, test_setup_code, challenge_test_list; not shipped: point `--data` at it),
3-shot prompts from tasks 2, 3 and 4, the test split tasks 11-510, each program run in the sandbox.

A prompt is the three shots and the task, each block laid out as

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list[0]}
    {test_list[1]}
    {test_list[2]}
    [BEGIN]
    {code}
    [DONE]

with the task's block ending after `[BEGIN]` and a newline; generation stops at `[DONE]`. The program
run is `test_setup_code + "\\n" + completion + "\\n" + test_list` (the asserts; challenge tests unused).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cllama.fileio import read_jsonl

FIELDS = {"task_id": int, "text": str, "code": str, "test_list": list, "test_setup_code": str,
          "challenge_test_list": list}
FEW_SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
STOP_SEQUENCES = ("[DONE]",)
FORMAT = ("Google's original mbpp.jsonl: one JSON object per line with task_id (int), text, code, "
          "test_list (list of assert strings), test_setup_code and challenge_test_list")


def read_mbpp(path: str | os.PathLike) -> dict[int, dict]:
    """The tasks of an MBPP file by task_id; one clear error for a missing or malformed file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: MBPP data not found; download {FORMAT} "
                                "(github.com/google-research/google-research/tree/master/mbpp) and pass its path")
    tasks: dict[int, dict] = {}
    for number, row in read_jsonl(path, "MBPP file", f"expected {FORMAT}"):
        bad = [k for k, kind in FIELDS.items() if not isinstance(row.get(k) if isinstance(row, dict) else None, kind)]
        if bad:
            raise ValueError(f"{path}:{number}: fields {bad} missing or of the wrong type; expected {FORMAT}")
        tasks[row["task_id"]] = row
    missing = [i for i in FEW_SHOT_IDS if i not in tasks]
    if missing:
        raise ValueError(f"{path}: lacks the few-shot tasks {missing} (task_id 2, 3, 4); expected {FORMAT}")
    if not any(i in tasks for i in TEST_IDS):
        raise ValueError(f"{path}: no task of the test split (task_id 11-510); expected {FORMAT}")
    return tasks


def block(task: dict, solved: bool) -> str:
    """One task's block: the shots end with their code and `[DONE]`, the task with `[BEGIN]` and a newline."""
    head = (f"You are an expert Python programmer, and here is your task: {task['text']} "
            f"Your code should pass these tests:\n\n" + "\n".join(task["test_list"]) + "\n[BEGIN]\n")
    return head + (task["code"].replace("\r\n", "\n").strip() + "\n[DONE]\n" if solved else "")


def mbpp_prompt(tasks: dict[int, dict], task_id: int) -> str:
    """The 3-shot prompt of a task (shots: tasks 2, 3, 4)."""
    return "".join(block(tasks[i], True) for i in FEW_SHOT_IDS) + block(tasks[task_id], False)


def mbpp_tasks(path: str | os.PathLike, limit: Optional[int] = None) -> dict[str, dict]:
    """The test split (11-510) as evaluation tasks `MBPP/<id>` in id order, the first `limit` if given:
    {task_id, prompt, suffix "", test (the asserts), setup, canonical, benchmark "mbpp"}."""
    data = read_mbpp(path)
    ids = [i for i in TEST_IDS if i in data]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        ids = ids[:limit]
    return {f"MBPP/{i}": {"task_id": f"MBPP/{i}", "prompt": mbpp_prompt(data, i), "suffix": "",
                          "test": "\n".join(data[i]["test_list"]), "setup": data[i]["test_setup_code"],
                          "canonical": data[i]["code"], "entry_point": "", "benchmark": "mbpp"} for i in ids}


def completion_of(generated: str) -> str:
    """The code of a generation: the text before `[DONE]`."""
    cut = generated.find(STOP_SEQUENCES[0])
    return (generated if cut < 0 else generated[:cut]).strip("\n") + "\n"
