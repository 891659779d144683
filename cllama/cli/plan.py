"""`cllama plan`: how many devices a preset needs (per-rank memory of every layout, which fit), and on
Ascend/GPU a compile check of one layout (`--compile`)."""
from __future__ import annotations

from cllama.cli.common import command, device_arg, print_json


def _settings(args):
    from cllama.distributed.planner import PlanSettings

    if args.lora and args.lora_rank < 1:
        raise ValueError(f"--lora-rank {args.lora_rank}: must be >= 1")
    return PlanSettings.create(args.lora_rank if args.lora else 0, seq_length=args.seq_length,
                               batch_size=args.batch_size, micro_batch_num=args.micro_batch, recompute=args.recompute,
                               optimizer_parallel=args.optimizer_parallel, seq_parallel=args.seq_parallel,
                               flash_attention=args.flash_attention, vocab_emb_dp=not args.split_vocab,
                               inference=args.inference)


def _layout(args) -> list[tuple[int, int, int]] | None:
    given = [args.dp, args.mp, args.pp]
    if not any(given):
        return None
    dp, mp, pp = (v or 1 for v in given)
    if dp * mp * pp != args.devices:
        raise ValueError(f"--dp {dp} x --mp {mp} x --pp {pp} = {dp * mp * pp}, not --devices {args.devices}")
    return [(dp, mp, pp)]


def _plan(args) -> int:
    from cllama.config import PRESETS, ModelConfig
    from cllama.distributed.planner import plan, plan_table

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}: not a preset; choose one of {sorted(PRESETS)}")
    config = ModelConfig.from_name(args.preset)
    settings = _settings(args)
    layouts = _layout(args)
    if args.compile:
        return _compile(args, config, settings, layouts)
    result = plan(config, args.devices, settings, args.device_memory, args.max_device_memory, layouts)
    result["preset"] = args.preset
    if args.json:
        print_json(result)
        return 0
    import pandas as pd

    usable = result["usable_bytes"] / 1e9
    print(f"{args.preset} ({result['params'] / 1e9:.1f}B parameters), {result['mode']} on {args.devices} device(s) "
          f"of {args.device_memory:g} GB, {usable:.1f} GB usable each (GB per rank, busiest pipeline stage):")
    print(pd.DataFrame(plan_table(result)).to_string(index=False))
    print("fits:", "yes" if result["fits"] else f"no layout of {args.devices} devices fits")
    return 0


def _compile(args, config, settings, layouts) -> int:
    from cllama.config import ModelConfig
    from cllama.distributed.compile_check import compile_check
    from cllama.distributed.parallel import ParallelConfig
    from cllama.runtime import init_context

    if layouts is None:
        raise ValueError("--compile checks one layout: give --dp/--mp/--pp")
    init_context(args.device)
    dp, mp, pp = layouts[0]
    parallel = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp,
                              micro_batch_num=max(args.micro_batch, pp), vocab_emb_dp=not args.split_vocab,
                              use_seq_parallel=args.seq_parallel)
    config = ModelConfig.from_name(args.preset, seq_length=args.seq_length, use_flash_attention=args.flash_attention)
    report = compile_check(config, parallel, args.out, args.seq_length, args.batch_size, args.optimizer_parallel,
                           settings.lora)
    print_json(report)
    if report["differences"]:
        raise RuntimeError(f"{len(report['differences'])} parameters laid out differently by MindSpore than by "
                           f"cllama; first: {report['differences'][0]}")
    return 0


def add_plan(sub) -> None:
    p = command(sub, "plan", _plan, "per-rank memory of every dp x mp x pp layout of N devices, and which fit",
                description="Weights, gradients, optimizer state and activations per rank (Korthikanti et al. "
                            "2022 for activations) for training (or --inference), every layout of --devices, "
                            "the busiest pipeline stage. --compile (Ascend/GPU) compiles one layout's training "
                            "graph and diffs MindSpore's strategy file against cllama's layouts.")
    p.add_argument("--preset", required=True, help="model preset, e.g. codellama-34b")
    p.add_argument("--devices", type=int, required=True, help="devices in the job")
    p.add_argument("--device-memory", type=float, default=64.0, help="GB per device (default 64: Atlas 800T A2)")
    p.add_argument("--max-device-memory", type=float,
                   help="GB MindSpore may take (context.max_device_memory; default 54/64 of --device-memory)")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence (default 4096, the card's)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per data-parallel rank")
    p.add_argument("--micro-batch", type=int, default=1, help="pipeline micro-batches per step (micro_batch_num)")
    p.add_argument("--recompute", action="store_true", help="full recompute (recompute_config.recompute)")
    p.add_argument("--optimizer-parallel", action="store_true",
                   help="split optimizer state over data parallel (enable_parallel_optimizer)")
    p.add_argument("--seq-parallel", action="store_true", help="use_seq_parallel")
    p.add_argument("--flash-attention", action="store_true", help="use_flash_attention (no softmax kept)")
    p.add_argument("--split-vocab", action="store_true", help="vocab_emb_dp False: embedding and head over mp")
    p.add_argument("--lora", action="store_true", help="LoRA on wq/wk/wv/wo: adapters trained, base frozen")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = rank; default 16)")
    p.add_argument("--inference", action="store_true", help="generation: weights, KV cache, one layer's work")
    p.add_argument("--dp", type=int, help="plan (or --compile) only this layout: data parallel")
    p.add_argument("--mp", type=int, help="model parallel")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--json", action="store_true", help="one JSON object: layouts with per-rank bytes and fits")
    p.add_argument("--compile", action="store_true", help="Ascend/GPU: compile the semi-auto training graph of "
                                                          "--dp/--mp/--pp and diff MindSpore's strategy file")
    p.add_argument("--out", default="plan_compile", help="--compile: where MindSpore's strategy file goes")
    device_arg(p)
