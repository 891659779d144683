"""Pipelines of stage notebooks executed with papermill: run folders, stage outputs passed on by
name, and the run ledger `papermill_runs/index.csv`.

A pipeline file (configs/pipelines/*.yaml):

    name: demo
    params: {seed: 0}                # given to every stage whose notebook has the parameter
    stages:
      - name: pretrain
        notebook: notebooks/03_pretrain.ipynb
        params: {steps: 200}
      - name: finetune
        notebook: notebooks/04_finetune.ipynb
        params: {model: "${pretrain.artifacts.checkpoint}"}

`${stage.artifacts.X}`, `${stage.metrics.X}` and `${stage.params.X}` read an earlier stage's
results.json; `${run_dir}` is the run folder. The runner sets every stage's `output_dir`.
Running them is cllama.workbench.runner's.
"""
from __future__ import annotations

import ast
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cllama.fileio import read_yaml
from cllama.runtime import REPO_ROOT
from cllama.train import runconfig
from cllama.workbench.stage_notebooks import notebook_parameters, outputs, shown

REF = re.compile(r"\$\{([^}]*)\}")
REF_KINDS = ("artifacts", "metrics", "params")


@dataclass
class Stage:
    name: str
    notebook: Path
    params: dict = field(default_factory=dict)


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    source: str = "pipeline"
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "stages": [{"name": s.name, "notebook": str(s.notebook), "params": s.params} for s in self.stages]}


# ---- loading and validation ---------------------------------------------------------------------------
def find_notebook(path: str | os.PathLike, source: str = "pipeline") -> Path:
    """A notebook path as given, else relative to the repository root."""
    path = Path(path)
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir():
            raise ValueError(f"{source}: notebook {path} is a folder; give the .ipynb file")
    raise FileNotFoundError(f"{source}: notebook {path} not found (relative paths are tried from the current "
                            f"folder and from {REPO_ROOT})")


def find_pipeline(path: str | os.PathLike) -> Path:
    """A pipeline file as given, else under the repository root or configs/pipelines/ (NAME or NAME.yaml)."""
    path = Path(path)
    names = [path] if path.suffix else [path, path.with_suffix(".yaml")]
    for name in names:
        for candidate in (name, REPO_ROOT / name, REPO_ROOT / "configs" / "pipelines" / name):
            if candidate.is_file():
                return candidate.resolve()
    raise FileNotFoundError(f"pipeline {path} not found (also looked in {REPO_ROOT / 'configs' / 'pipelines'})")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """["stage.param=VALUE", "param=VALUE"] -> dict; VALUE is read as JSON (numbers, lists, true), else text."""
    return runconfig.parse_overrides(pairs, "STAGE.PARAM=VALUE or PARAM=VALUE", "pretrain.steps=50")


def load_pipeline(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Pipeline:
    """Read a pipeline YAML and apply overrides (`stage.param` for one stage, `param` for every stage
    whose notebook has it). Structure errors name the file and field; see `validate` for the rest."""
    path = find_pipeline(path)
    source = str(path)
    doc = read_yaml(path, "pipeline YAML", "see configs/pipelines/demo.yaml")
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a mapping with name and stages")
    unknown = set(doc) - {"name", "description", "params", "stages"}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; a pipeline has name, description, params, "
                         "stages")
    name = doc.get("name") or path.stem
    if not re.fullmatch(r"[\w.-]+", str(name)):
        raise ValueError(f"{source}: name {name!r}: use letters, digits, '_', '-' or '.' (it names the run folder)")
    shared = doc.get("params") or {}
    stages_doc = doc.get("stages")
    if not isinstance(shared, dict):
        raise ValueError(f"{source}: params must be a mapping of parameter: value")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise ValueError(f"{source}: stages must be a non-empty list of {{name, notebook, params}}")
    stages, seen = [], set()
    for i, entry in enumerate(stages_doc):
        where = f"{source}: stages[{i}]"
        if not isinstance(entry, dict) or "notebook" not in entry:
            raise ValueError(f"{where}: each stage needs notebook (and optionally name, params)")
        extra = set(entry) - {"name", "notebook", "params"}
        if extra:
            raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; a stage has name, notebook, params")
        if not isinstance(entry["notebook"], str) or not entry["notebook"].strip():
            raise ValueError(f"{where}: notebook must be the path of an .ipynb file (got {entry['notebook']!r})")
        stage_name = str(entry.get("name") or Path(entry["notebook"]).stem.split("_", 1)[-1])
        if not re.fullmatch(r"[A-Za-z_][\w-]*", stage_name):
            raise ValueError(f"{where}: name {stage_name!r}: start with a letter, then letters, digits, '_' or '-'")
        if stage_name in seen:
            raise ValueError(f"{where}: stage name {stage_name!r} is used twice; give each stage its own name")
        seen.add(stage_name)
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{where} ({stage_name}): params must be a mapping of parameter: value")
        notebook = find_notebook(entry["notebook"], f"{source}: stage {stage_name!r}")
        stages.append(Stage(stage_name, notebook, dict(params)))
    pipeline = Pipeline(str(name), stages, source, str(doc.get("description") or ""))
    declared = {s.name: notebook_parameters(s.notebook, f"{source}: stage {s.name!r}") for s in stages}
    for stage in stages:  # shared params go to every stage that declares them, under its own
        stage.params = {**{k: v for k, v in shared.items() if k in declared[stage.name]}, **stage.params}
    unused = [k for k in shared if not any(k in d for d in declared.values())]
    if unused:
        raise ValueError(f"{source}: params {unused} are declared by no stage's notebook")
    for key, value in (overrides or {}).items():
        stage_name, dot, param = key.rpartition(".")
        targets = [s for s in stages if s.name == stage_name] if dot else \
            [s for s in stages if key in declared[s.name]]
        if dot and not targets:
            raise ValueError(f"override {key!r}: no stage named {stage_name!r} (stages: {[s.name for s in stages]})")
        if not targets:
            raise ValueError(f"override {key!r}: no stage's notebook has a parameter {key!r}")
        for stage in targets:
            stage.params[param if dot else key] = value
    validate(pipeline)
    return pipeline


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _type_problem(name: str, default_src: str, value: Any) -> Optional[str]:
    """Why `value` cannot stand for a parameter whose default is `default_src`, or None."""
    if isinstance(value, str) and REF.fullmatch(value.strip()):
        return None  # checked when the reference resolves
    default = _literal(default_src)
    kinds = [(bool, "true/false"), ((int, float), "a number"), (str, "a string"), ((list, tuple), "a list"),
             (dict, "a mapping")]
    for kind, text in kinds:
        if isinstance(default, kind) and not (isinstance(value, bool) if kind is bool else
                                              isinstance(value, kind) and not isinstance(value, bool)):
            return f"{name} must be {text} like its default {default_src} (got {value!r})"
    return None


def validate(pipeline: Pipeline) -> None:
    """Every stage parameter exists in its notebook with a value of the default's type, no stage sets
    output_dir, and every ${stage.kind.name} names an earlier stage and something its notebook writes
    (as far as `stage_notebooks.outputs` can read it). One error lists every problem."""
    problems = []
    earlier: dict[str, Stage] = {}
    for stage in pipeline.stages:
        declared = notebook_parameters(stage.notebook, f"{pipeline.source}: stage {stage.name!r}")
        where = f"stage {stage.name!r} ({stage.notebook.name})"
        if "output_dir" not in declared:
            problems.append(f"{where}: the notebook has no output_dir parameter; the runner needs one")
        unknown = sorted(set(stage.params) - set(declared))
        if unknown:
            problems.append(f"{where}: unknown parameter(s) {unknown}; {stage.notebook.name} takes "
                            f"{sorted(set(declared) - {'output_dir'})}")
        if "output_dir" in stage.params:
            problems.append(f"{where}: output_dir is set by the runner (<run folder>/NN_{stage.name}); remove it")
        for param, value in stage.params.items():
            if param in declared and param != "output_dir":
                problem = _type_problem(param, declared[param]["default"], value)
                if problem:
                    problems.append(f"{where}: {problem}")
            for ref in _references(value):
                problem, _ = _reference_status(ref, earlier)
                if problem:
                    problems.append(f"stage {stage.name!r} param {param!r}: {problem}")
        earlier[stage.name] = stage
    if problems:
        raise ValueError(f"{pipeline.source}: " + ("\n  " if len(problems) > 1 else "") + "\n  ".join(problems))


def check_pipeline(pipeline: Pipeline) -> list[dict]:
    """Checks beyond `validate`, for a pipeline meant for another machine (e.g. an Ascend cluster):
    each stage's run YAML (`config`, with the stage's config_overrides and peft choice) loads, its
    parallel layout fits the stage's device count (workers x nodes) and the model, and its per-rank
    memory plan (cllama.distributed.planner) fits the devices (Ascend/GPU runs). Returns what was
    checked, per stage, with the plan (`memory_plan_gb`) and what became of each ${...} reference
    (`references`: checked against the producing notebook, or why it could not be)."""
    references = reference_checks(pipeline)
    report = []
    for stage in pipeline.stages:
        entry = _check_stage(pipeline, stage)
        if references[stage.name]:
            entry["references"] = references[stage.name]
        report.append(entry)
    return report


def _check_stage(pipeline: Pipeline, stage: Stage) -> dict:
    from cllama.distributed.parallel import parallel_mode_name
    from cllama.distributed.planner import GB, plan_run, plan_table
    from cllama.train.runconfig import find_config, load_run_config, peft_overrides

    config = stage.params.get("config")
    if not isinstance(config, str) or not config or REF.search(config):
        return {"stage": stage.name, "checked": "parameters"}
    where = f"{pipeline.source}: stage {stage.name!r}: config {config}"
    try:
        extra = stage.params.get("config_overrides") or {}
        lora = {k: stage.params[f"lora_{k}"] for k in ("rank", "alpha", "dropout", "targets")
                if f"lora_{k}" in stage.params}
        extra = {**(extra if isinstance(extra, dict) else {}), **peft_overrides(stage.params.get("peft", ""), **lora)}
        run = load_run_config(find_config(config), extra)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{where}: {err}") from None
    workers, nodes = int(stage.params.get("workers", 1)), int(stage.params.get("nodes", 1))
    devices = workers * nodes
    entry = {"stage": stage.name, "checked": "parameters, run config", "config": str(find_config(config)),
             "params": run.model.num_params(), "devices": devices}
    if devices > 1:
        mode = parallel_mode_name(run.parallel.get("parallel_mode", 0)) if run.use_parallel else "data_parallel"
        device = "CPU" if mode == "data_parallel" else "Ascend"  # semi-auto layouts are for Ascend
        try:
            settings = run.parallel_settings(device, devices)
        except ValueError as err:
            raise ValueError(f"{where} on {workers} worker(s) x {nodes} node(s): {err}") from None
        entry.update(checked="parameters, run config, parallel layout", auto_parallel_context=settings)
    if run.device == "CPU":  # host memory, and the data's length decides: nothing to plan
        return entry
    memory = plan_run(run, devices)
    entry["memory_plan_gb"] = {**plan_table(memory)[0], "usable": round(memory["usable_bytes"] / GB, 2)}
    if not memory["fits"]:
        row = entry["memory_plan_gb"]
        raise ValueError(f"{where} on {devices} device(s): each rank needs {row['total']} GB (weights "
                         f"{row['weights']}, gradients {row['gradients']}, optimizer {row['optimizer']}, "
                         f"activations {row['activations']}), more than the {row['usable']} GB usable; "
                         "`cllama plan` lists layouts that fit")
    return entry


def _references(value: Any) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _references(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _references(v)]
    return []


def _reference_status(ref: str, earlier: Mapping[str, Stage]) -> tuple[Optional[str], str]:
    """(what is wrong with ${ref}, None if nothing; what was checked)."""
    if ref == "run_dir":
        return None, "the run folder"
    parts = ref.split(".", 2)
    if len(parts) != 3 or parts[1] not in REF_KINDS:
        return (f"${{{ref}}}: write ${{STAGE.artifacts.NAME}}, ${{STAGE.metrics.NAME}}, ${{STAGE.params.NAME}} "
                "or ${run_dir}"), ""
    stage, kind, name = parts
    if stage not in earlier:
        return f"${{{ref}}}: {stage!r} is not an earlier stage (earlier: {list(earlier)})", ""
    found = outputs(earlier[stage].notebook)
    names, unread = sorted(found.names[kind]), found.unread[kind]
    producer = f"stage {stage!r} ({shown(earlier[stage].notebook)})"
    if name in names:
        return None, f"checked: {shown(earlier[stage].notebook)} writes it"
    if unread:
        return None, (f"not checked: {producer} computes some {kind} names at run time ({'; '.join(unread)}); "
                      "the run checks it when it resolves the reference")
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5) or \
        [n for n in names if re.fullmatch(".*".join(map(re.escape, name)) + ".*", n)][:1]  # ckpt -> checkpoint
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"${{{ref}}}: {producer} produces {kind} {names}{hint}" if names else \
        f"${{{ref}}}: {producer} produces no {kind}", ""


def reference_checks(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """What `validate` could check of each stage's ${...} references: {stage: {reference: note}}."""
    out: dict[str, dict[str, str]] = {}
    earlier: dict[str, Stage] = {}
    for stage in pipeline.stages:
        refs = sorted({ref for value in stage.params.values() for ref in _references(value)})
        out[stage.name] = {f"${{{ref}}}": problem or note for ref in refs
                           for problem, note in [_reference_status(ref, earlier)]}
        earlier[stage.name] = stage
    return out


def resolve(value: Any, done: Mapping[str, dict], run_dir: Path) -> Any:
    """Substitute ${...} references with earlier stages' results (a whole-string reference keeps
    the value's type; references inside text become text)."""
    if isinstance(value, (list, tuple)):
        return [resolve(v, done, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, done, run_dir) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def lookup(ref: str) -> Any:
        if ref == "run_dir":
            return str(run_dir)
        stage, kind, name = ref.split(".", 2)
        section = done[stage].get(kind) or {}
        if name not in section:
            raise ValueError(f"${{{ref}}}: stage {stage!r} wrote no {kind} {name!r}; it has {sorted(section)}")
        return section[name]

    whole = REF.fullmatch(value.strip())
    if whole:
        return lookup(whole.group(1))
    return REF.sub(lambda m: str(lookup(m.group(1))), value)
