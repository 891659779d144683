"""`cllama` subcommands of stages 00-05: tokenizer, model, convert, ckpt, data, train, ranktable."""
from __future__ import annotations

import argparse
import sys

from cllama.cli.common import check_ranges, command, device_arg, init_device, parse_set, print_json

MAX_SHARDS = 1000  # MindRecord's FileWriter writes at most 1000 shard files
LAYOUT_BOUNDS = (("--dp", 1, None), ("--mp", 1, None), ("--pp", 1, None))


# ---- tokenizer, model ---------------------------------------------------------------------------
def _tokenizer_extend(args) -> int:
    from cllama.tokenizer import Tokenizer, bundled_tokenizer_path, extend_tokenizer

    tok = Tokenizer(extend_tokenizer(args.src or bundled_tokenizer_path(), args.dst, args.overwrite))
    print_json({"tokenizer": str(tok.path), "vocab_size": tok.vocab_size, "prefix_id": tok.prefix_id,
                 "suffix_id": tok.suffix_id, "middle_id": tok.middle_id, "eot_id": tok.eot_id})
    return 0


def _model_init(args) -> int:
    from cllama.config import ModelConfig

    check_ranges(args, ("--seed", 0, None))
    config = ModelConfig.from_name(args.preset, **parse_set(args.set))
    init_device(args)
    from cllama.checkpoint.model_dir import save_random_model

    out = save_random_model(args.out, config, args.seed, args.tokenizer, overwrite=args.overwrite)
    print_json({"model_dir": str(out), "preset": args.preset, "params": config.num_params(),
                 "random_weights": True, "seed": args.seed})
    return 0


def _model_info(args) -> int:
    from cllama.checkpoint.files import check_model_dir
    from cllama.config import PRESETS, ModelConfig

    config = ModelConfig.from_name(args.source) if args.source in PRESETS else \
        ModelConfig.load(check_model_dir(args.source))
    print_json({"params": config.num_params(), "head_dim": config.head_dim,
                 "ffn_hidden_size": config.ffn_hidden_size, "config": config.to_dict()})
    return 0


def add_model(sub) -> None:
    from cllama.config import PRESETS

    tok = sub.add_parser("tokenizer", help="tokenizer utilities").add_subparsers(dest="action", required=True)
    ext = command(tok, "extend", _tokenizer_extend,
                  "Llama 2 tokenizer (32000) -> Code Llama-style (32016, infill pieces)")
    ext.add_argument("--src", help="32000-piece SentencePiece model (default: the bundled Llama 2 one)")
    ext.add_argument("--dst", required=True, help="where to write the 32016-piece model")
    ext.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    cmds = sub.add_parser("model", help="model presets and model directories") \
        .add_subparsers(dest="action", required=True)
    init = command(cmds, "init", _model_init, "write a model directory with random weights")
    init.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    init.add_argument("--out", required=True, help="model directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", help="tokenizer.model to copy in (default: bundled, extended to "
                                          "32016 pieces when the vocabulary is 32016)")
    init.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    init.add_argument("--overwrite", action="store_true", help="replace a non-empty --out whole")
    device_arg(init)
    info = command(cmds, "info", _model_info, "config and parameter count of a preset or model directory")
    info.add_argument("source", help="preset name or model directory")


# ---- convert, ckpt ------------------------------------------------------------------------------
CONVERSIONS = {"hf2ms": ("hf", "Hugging Face Llama folder -> model directory (MindSpore .ckpt)", "HF_DIR", "MODEL_DIR"),
               "ms2hf": ("ms", "model directory -> Hugging Face folder (safetensors)", "MODEL_DIR", "HF_DIR"),
               "meta2ms": ("meta", "Meta consolidated.NN.pth + params.json -> model directory", "META_DIR",
                           "MODEL_DIR")}


def _convert(args) -> int:
    import warnings

    from cllama.checkpoint import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convert.VocabularyWarning)  # listed in the summary below
        summary = convert.convert(CONVERSIONS[args.action][0], args.src, args.dst, args.dtype,
                                  args.max_shard_size, progress=not args.no_progress, fmt=args.format,
                                  overwrite=args.overwrite)
    for message in summary["warnings"]:
        print(f"cllama convert: warning: {message}", file=sys.stderr)
    print_json(summary)
    return 0


def _layout_args(p, required: bool) -> None:
    for flag, name in (("--dp", "data_parallel"), ("--mp", "model_parallel"), ("--pp", "pipeline_stage")):
        p.add_argument(flag, type=int, default=1 if required else None, help=name)
    p.add_argument("--vocab-emb-dp", action=argparse.BooleanOptionalAction, default=True,
                   help="replicate embedding and lm_head (MindFormers' default); --no-vocab-emb-dp splits "
                        "them by vocabulary over model_parallel")


def _layouts(args, config):
    from cllama.distributed.strategy import make_parallel, param_layouts

    return param_layouts(config, make_parallel(args.dp or 1, args.mp or 1, args.pp or 1, args.vocab_emb_dp))


def _ckpt_strategy(args) -> int:
    from cllama.checkpoint.files import check_model_dir
    from cllama.config import ModelConfig
    from cllama.distributed.strategy import device_count, memory_per_rank, write_strategy

    check_ranges(args, *LAYOUT_BOUNDS)
    if bool(args.model) == bool(args.preset):
        raise ValueError("give exactly one of --model DIR or --preset NAME")
    config = ModelConfig.load(check_model_dir(args.model)) if args.model else ModelConfig.from_name(args.preset)
    layouts = _layouts(args, config)
    path = write_strategy(layouts, args.out, stage_dir=args.stage_dir)
    print_json({"strategy": str(path), "devices": device_count(layouts), "params": len(layouts),
                "bytes_per_rank": memory_per_rank(layouts, config.param_itemsize)})
    return 0


def _ckpt_transform(args) -> int:
    from cllama.distributed.transform import find_source, transform, transform_rank

    check_ranges(args, *LAYOUT_BOUNDS, ("--rank", 0, None))
    dst_strategy = args.dst_strategy
    if any(v is not None for v in (args.dp, args.mp, args.pp)):
        if dst_strategy:
            raise ValueError("give either --dst-strategy or --dp/--mp/--pp, not both")
        from cllama.config import ModelConfig

        dst_strategy = _layouts(args, ModelConfig.load(find_source(args.src, args.src_strategy).path))
    if args.rank is not None:
        out = transform_rank(args.src, args.rank, args.dst, args.src_strategy, dst_strategy)
        print_json({"rank": args.rank, "checkpoint": str(out), "verified": False})
    else:
        print_json(transform(args.src, args.dst, args.src_strategy, dst_strategy, verify=not args.no_verify,
                             overwrite=args.overwrite, fmt=args.format))
    return 0


def _ckpt_merge(args) -> int:
    from cllama.distributed.transform import merge

    print_json(merge(args.src, args.dst, args.strategy, overwrite=args.overwrite, fmt=args.format))
    return 0


def add_checkpoints(sub) -> None:
    from cllama.checkpoint.convert import DEFAULT_SHARD_SIZE
    from cllama.checkpoint.files import FORMATS
    from cllama.config import DTYPES, PRESETS

    cmds = sub.add_parser("convert", help="weights: Hugging Face / Meta <-> cllama model directory (streaming)") \
        .add_subparsers(dest="action", required=True)
    for action, (_, text, src, dst) in CONVERSIONS.items():
        c = command(cmds, action, _convert, text)
        c.add_argument("--src", required=True, metavar=src)
        c.add_argument("--dst", required=True, metavar=dst)
        c.add_argument("--dtype", choices=DTYPES, help="output dtype (default: keep the stored one)")
        c.add_argument("--format", choices=FORMATS, default="ckpt",
                       help="hf2ms/meta2ms: model.ckpt (default) or model.safetensors (MindSpore's safetensors)")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        c.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst whole")
        c.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                       help=f"ms2hf: shard above this size (default {DEFAULT_SHARD_SIZE})")
    cmds = sub.add_parser("ckpt", help="distributed checkpoints: strategy files, split, merge, re-shard") \
        .add_subparsers(dest="action", required=True)
    st = command(cmds, "strategy", _ckpt_strategy, "write the strategy file of a dp/mp/pp layout")
    st.add_argument("--model", help="model directory (its config.json)")
    st.add_argument("--preset", choices=sorted(PRESETS), help="or a preset name")
    _layout_args(st, required=True)
    st.add_argument("--out", required=True, help="strategy file to write (merged over pipeline stages)")
    st.add_argument("--stage-dir", help="also keep one strategy file per pipeline stage here")
    tr = command(cmds, "transform", _ckpt_transform, "full -> shards, shards -> full, or layout A -> layout B")
    tr.add_argument("--src", required=True, help="model dir, .ckpt file, or folder of rank_X/ shards")
    tr.add_argument("--src-strategy", help="strategy of sharded --src (file or per-stage folder; "
                                           "default: <src>/strategy.ckpt)")
    tr.add_argument("--dst", required=True, help="output folder (model dir when merging)")
    tr.add_argument("--dst-strategy", help="target layout's strategy file or per-stage folder; omit to merge")
    _layout_args(tr, required=False)
    tr.add_argument("--rank", type=int, help="write only this destination rank (transform_checkpoint_by_rank)")
    tr.add_argument("--no-verify", action="store_true", help="skip the round-trip checksum verification")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    tr.add_argument("--format", choices=FORMATS, help="output format (default: the source's)")
    mg = command(cmds, "merge", _ckpt_merge, "a sharded run's checkpoints/step_N/ (rank_K/ shards + strategy) "
                                             "-> a model directory")
    mg.add_argument("--src", required=True, help="the step folder: rank_K/ shards and strategy.ckpt")
    mg.add_argument("--dst", required=True, help="model directory to write")
    mg.add_argument("--strategy", help="the run's strategy file or per-stage folder (default: <src>/strategy.ckpt)")
    mg.add_argument("--format", choices=FORMATS, help="output format (default: the shards')")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --dst")


# ---- data ---------------------------------------------------------------------------------------
def _data_alpaca(args) -> int:
    from cllama.data.prepare import convert_alpaca

    print_json({"conversations": str(args.dst), "records": convert_alpaca(args.src, args.dst, args.overwrite)})
    return 0


def _data_prepare(args) -> int:
    from cllama.data.prepare import MIN_SEQ_LENGTH, prepare

    check_ranges(args, ("--seq-length", MIN_SEQ_LENGTH, None), ("--shards", 1, MAX_SHARDS), ("--workers", 1, None),
                 ("--seed", 0, None), ("--max-files", 1, None), ("--fim-rate", 0.0, 1.0))
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    prepared = prepare(args.action, args.src, args.dst, seq_length=args.seq_length, tokenizer=args.tokenizer,
                       template=getattr(args, "template", "vicuna"), glob=getattr(args, "glob", None),
                       max_files=getattr(args, "max_files", None), fim_rate=getattr(args, "fim_rate", 0.0),
                       val_fraction=args.val_fraction, seed=args.seed, shards=args.shards, workers=args.workers,
                       progress=not args.quiet, overwrite=args.overwrite)
    print_json({"dataset": str(prepared.path), "val_dataset": prepared.val_path and str(prepared.val_path),
                 "stats_file": str(prepared.stats_path), **prepared.stats})
    return 0


def add_data(sub) -> None:
    from cllama.data.corpus import TEMPLATES

    cmds = sub.add_parser("data", help="datasets: Alpaca -> conversations, qa / wiki / code -> MindRecord",
                          description="Write MindRecord datasets of seq_length+1 int32 tokens. Every DST "
                          "X.mindrecord gets X.stats.json beside it, and with --val-fraction a held-out "
                          "X.val.mindrecord; --shards K writes X.mindrecord0..K-1. An existing DST (any of its "
                          "files) is refused unless --overwrite.").add_subparsers(dest="action", required=True)
    alpaca = command(cmds, "alpaca", _data_alpaca, "Alpaca JSON -> conversation JSON (MindFormers alpaca_converter)")
    alpaca.add_argument("--src", required=True, help="Alpaca JSON list of {instruction, input, output}")
    alpaca.add_argument("--dst", required=True, help="conversation JSON to write")
    alpaca.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    kinds = {"qa": ("conversations (or Alpaca records) -> {input_ids, labels}, prompts masked",
                    "conversation JSON from `cllama data alpaca` (Alpaca JSON is converted on the fly)"),
             "wiki": ("WikiText -> cleaned paragraphs packed into {input_ids}",
                      "WikiText file(s), e.g. wikitext-2-raw/wiki.train.raw"),
             "code": ("source files -> documents packed into {input_ids}, optional FIM",
                      "folder(s) to search with --glob (or files)")}
    for kind, (text, src_help) in kinds.items():
        q = command(cmds, kind, _data_prepare, text)
        q.add_argument("--src", required=True, nargs="+", help=src_help)
        q.add_argument("--dst", required=True, help="dataset to write, e.g. out/train.mindrecord")
        q.add_argument("--seq-length", type=int, required=True, help="model seq_length; samples hold N+1 tokens")
        q.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: the bundled Llama 2 one)")
        q.add_argument("--val-fraction", type=float, default=0.0,
                       help="hold out this fraction of examples/documents as X.val.mindrecord (default 0)")
        q.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and FIM draws")
        q.add_argument("--shards", type=int, default=1,
                       help=f"MindRecord files to split the training set into (1..{MAX_SHARDS})")
        q.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --dst whole: every file of the "
                       "dataset (shards, .db indexes, held-out set, stats) is replaced or removed")
    cmds.choices["qa"].add_argument("--template", default="vicuna", choices=TEMPLATES,
                                    help="vicuna: Vicuna v1.1 (MindFormers' default); "
                                         "inst: Code Llama - Instruct [INST]")
    code = cmds.choices["code"]
    code.add_argument("--glob", default="**/*.py", help="file pattern under each folder (default '**/*.py')")
    code.add_argument("--max-files", type=int, help="use only the first N files (sorted by path)")
    code.add_argument("--fim-rate", type=float, nargs="?", const=0.9, default=0.0,
                      help="fill-in-the-middle rate; bare --fim-rate means 0.9 as in Code Llama (default 0: off). "
                           "Without --tokenizer the bundled one is extended to 32016 pieces beside DST")


# ---- train, ranktable ---------------------------------------------------------------------------
def _train(args) -> int:
    from cllama.train.launch import launch_plan, train_or_launch
    from cllama.train.runconfig import load_run_config

    check_ranges(args, ("--workers", 1, None), ("--devices-per-node", 1, None))
    overrides = parse_set(args.set)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.format:
        overrides["callbacks.CheckpointMointor.checkpoint_format"] = args.format
    run = load_run_config(args.config, overrides)
    if args.check or args.print_msrun:
        plan = launch_plan(run, args.config, args.devices_per_node, args.master_addr, args.rank_table)
        print("\n".join(plan["msrun"])) if args.print_msrun else print_json(plan)
        return 0
    result = train_or_launch(run, args.workers, resume=True if args.resume else None)
    if result is not None:
        print_json(result.to_dict())
    return 0


def _ranktable(args) -> int:
    from cllama.distributed import ranktable

    if args.action == "merge":
        table = ranktable.merge_rank_tables(args.tables)
    else:
        table, platform = ranktable.node_rank_table(args.device_num, args.server_ip, args.hccn_conf,
                                                    not args.ignore_platform)
        if platform is not None:
            print(f"using the ModelArts rank table {platform} (pass --ignore-platform to build one)")
    out = ranktable.write_rank_table(table, args.out or ranktable.default_name(table))
    print_json({"rank_table": str(out), "server_count": table["server_count"],
                 "devices": sum(len(s["device"]) for s in table["server_list"])})
    return 0


def add_train(sub) -> None:
    p = command(sub, "train", _train, "pretrain or finetune from a run YAML (configs/)")
    p.add_argument("--config", required=True, help="run YAML, e.g. configs/tiny/pretrain.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers on this machine (>1: msrun)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--format", choices=("ckpt", "safetensors"),
                   help="checkpoints written as (the YAML's CheckpointMointor.checkpoint_format; default ckpt)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override YAML keys (values read as JSON, else text), e.g. runner_config.max_steps=100 "
                        "train_dataset.data_loader.dataset_dir=data/train.mindrecord")
    p.add_argument("--check", action="store_true",
                   help="load and validate the config, print the parallel plan and msrun lines, do not train")
    p.add_argument("--print-msrun", action="store_true", help="print one msrun command line per node and exit")
    p.add_argument("--devices-per-node", type=int, default=8, help="for --check/--print-msrun (default 8)")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's IP, for --check/--print-msrun")
    p.add_argument("--rank-table",
                   help="HCCL rank table for msrun --rank_table_file (Ascend), for --check/--print-msrun")
    cmds = sub.add_parser("ranktable", help="HCCL rank tables for Ascend clusters").add_subparsers(dest="action",
                                                                                                   required=True)
    make = command(cmds, "make", _ranktable, "rank table of this server's NPUs")
    make.add_argument("--device-num", default="[0,8)", help='device id range, e.g. "[0,8)" or "[4,8)"')
    make.add_argument("--server-ip", help="this server's IP (default: resolved from the hostname)")
    make.add_argument("--hccn-conf", help="read device IPs from this file (address_<id>=<ip> lines) "
                                          "instead of hccn_tool or /etc/hccn.conf")
    make.add_argument("--ignore-platform", action="store_true",
                      help="build a table even when ModelArts provides /user/config/jobstart_hccl.json")
    merge = command(cmds, "merge", _ranktable, "merge per-server tables (rank ids renumbered in argument order)")
    merge.add_argument("tables", nargs="+", help="rank table JSON files, in rank order")
    for p in (make, merge):
        p.add_argument("--out", help="output JSON (default: hccl_<N>p_<ids>_<ip>.json)")
