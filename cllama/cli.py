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
                "msrun": cluster_commands(nodes, per_node, args.master_addr, worker_command(args.config))}
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
    p.set_defaults(func=_train)


# ---- ranktable ----------------------------------------------------------------------------------
def _ranktable_make(args) -> int:
    from cllama import ranktable

    platform = ranktable.platform_rank_table()
    if platform is not None and not args.ignore_platform:
        table = ranktable.read_rank_table(platform)
        print(f"using the ModelArts rank table {platform} (pass --ignore-platform to build one)")
    else:
        table = ranktable.make_rank_table(args.device_num, args.server_ip, args.hccn_conf)
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


# ---- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllama", description="Code Llama research workbench on MindSpore")
    parser.add_argument("--version", action="version", version=f"cllama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tokenizer(sub)
    _add_model(sub)
    _add_train(sub)
    _add_ranktable(sub)
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
