"""The `cllama` command line: one subcommand group per stage, each a thin call into the library
(handlers import lazily, so `cllama --help` loads no MindSpore). Defaults are the library's.
Stages 00-05 (weights, data, training, checkpoints) are in `training`, LoRA adapters in `lora`, the
memory planner in `plan`, 06-08 (evaluation, generation, export) in `inference`.

Exit codes: 0 done; 2 bad input (one line naming the file, field and fix, no traceback); 1 a failure
while running (one line); 130 interrupted. An unexpected exception (a bug in cllama) is one line too,
exit 1, saying so; `CLLAMA_TRACEBACK=1` prints its traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from cllama import __version__
from cllama.cli.common import command, print_json
from cllama.runtime import quiet_mindspore_logs

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


# ---- run (pipelines) ----------------------------------------------------------------------------
def _run(args) -> int:
    from cllama.workbench import pipeline, runner

    plan = pipeline.load_pipeline(args.pipeline, pipeline.parse_overrides(args.set))
    if args.check:
        print_json({"pipeline": plan.source, "valid": True, "checks": pipeline.check_pipeline(plan), **plan.to_dict()})
        return 0
    result = runner.run_pipeline(plan, args.runs_dir, progress=not args.quiet)
    failed = result.failed_stage
    if failed is not None:
        raise RuntimeError(f"stage {failed.name!r} failed: {failed.error}\n  executed notebook: {failed.executed}")
    return 0


def _runs(args) -> int:
    from cllama.workbench.ledger import LEDGER_FIELDS, read_ledger

    frame = read_ledger(args.runs_dir).tail(args.last)
    columns = [c for c in LEDGER_FIELDS if c not in ("params", "metrics", "run_dir", "stages")]
    print(frame[columns].to_string(index=False) if len(frame) else f"no runs in {args.runs_dir}/index.csv")
    return 0


def add_run(sub) -> None:
    p = command(sub, "run", _run, "run a pipeline of stage notebooks (papermill) in a new run folder",
                 description="Execute a pipeline YAML (configs/pipelines/) stage by stage in "
                 "<runs-dir>/<YYYYmmdd-HHMMSS>-<name>/ and add a row to <runs-dir>/index.csv. "
                 "Exits 1 when a stage fails (its executed notebook keeps the error).")
    p.add_argument("pipeline", help="pipeline YAML, or a name under configs/pipelines/ (e.g. demo)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override parameters: STAGE.PARAM=VALUE for one stage, PARAM=VALUE for every stage "
                        "that has it (values read as JSON, else text), e.g. --set pretrain.steps=50 seed=1")
    p.add_argument("--check", action="store_true", help="validate the pipeline (notebook parameters, "
                   "references, run configs and parallel layouts) without running it")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    r = command(sub, "runs", _runs, "the run ledger (<runs-dir>/index.csv), newest last")
    r.add_argument("--last", type=int, default=20, help="show the newest N runs (default 20)")
    for q in (p, r):
        q.add_argument("--runs-dir", default="papermill_runs", help="where run folders and index.csv go")


# ---- entry point --------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (a missing or malformed argument) as one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cllama", description="Code Llama research workbench on MindSpore")
    parser.add_argument("--version", action="version", version=f"cllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from cllama.cli import inference, lora, plan, training

    for add in (training.add_model, training.add_checkpoints, lora.add_lora, training.add_data, training.add_train,
                plan.add_plan, inference.add_inference, add_run):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_mindspore_logs()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BAD_INPUT as err:
        print(f"cllama {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as err:
        print(f"cllama {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late interrupt (e.g. a kernel's) must not end us with -2
        print(f"cllama {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not the user's input: one line unless asked for the traceback
        if os.environ.get("CLLAMA_TRACEBACK"):
            traceback.print_exc()
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(f"cllama {args.command}: internal error: {type(err).__name__}: {err} (at {Path(where.filename).name}:"
              f"{where.lineno}; a bug in cllama: rerun with CLLAMA_TRACEBACK=1 and report the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
