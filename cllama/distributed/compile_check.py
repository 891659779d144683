"""`cllama plan --compile`: compile the semi-auto parallel training graph of a layout without training,
keep the strategy file MindSpore writes while compiling, and diff it against the layouts cllama derives
from the model's strategies (cllama.distributed.strategy.model_layouts).

MindSpore compiles semi-auto parallel only for Ascend or GPU. On one Ascend machine with CANN it runs as
MindSpore's DryRun (`MS_SIMULATION_LEVEL=1`, `RANK_SIZE`, `RANK_ID`: rank 0 of the layout is simulated,
nothing runs on the devices, and MindSpore logs that rank's memory); under msrun (GPU, or Ascend
without DryRun) every worker compiles its own rank for real. On CPU it refuses with one line.

    cllama plan --preset codellama-34b --devices 32 --dp 4 --mp 4 --pp 2 --micro-batch 96 --compile
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cllama.config import ModelConfig
from cllama.distributed.parallel import ParallelConfig
from cllama.distributed.strategy import ParamLayout

COMPILE_DEVICES = ("Ascend", "GPU")


def diff_layouts(expected: Mapping[str, ParamLayout], written: Mapping[str, ParamLayout]) -> list[str]:
    """Where MindSpore's strategy file of one rank disagrees with cllama's layouts of that rank's
    pipeline stage: a parameter missing from it, or split into other slices (`splits`). Optimizer
    states and other entries of the file that are not model parameters are ignored."""
    out = []
    for name, lay in sorted(expected.items()):
        got = written.get(name)
        if got is None:
            out.append(f"{name}: not in MindSpore's strategy file")
        elif got.splits != lay.splits:
            out.append(f"{name}: MindSpore splits it {got.splits}, cllama {lay.splits}")
    return out


def compile_check(config: ModelConfig, parallel: ParallelConfig, out_dir: str | os.PathLike, seq_length: int,
                  batch_size: int = 1, optimizer_parallel: bool = False, lora=None) -> dict:
    """Compile one training step of `config` under `parallel` (semi-auto) and compare strategies.
    Returns {"strategy": file, "parameters": compared, "differences": [...], "dry_run": bool}."""
    import mindspore as ms

    device = ms.get_context("device_target")
    if device not in COMPILE_DEVICES:
        raise ValueError(f"--compile: MindSpore compiles semi-auto parallel only for Ascend or GPU and this machine "
                         f"runs {device}; run the same command on an Ascend host with CANN (DryRun) or under msrun "
                         "on the devices")
    import numpy as np
    from mindspore import Tensor
    from mindspore.communication import init
    from mindspore.nn.utils import no_init_parameters

    from cllama.distributed.parallel import auto_parallel_settings, launched_by_msrun
    from cllama.distributed.strategy import model_layouts, read_strategy
    from cllama.model import CodeLlama
    from cllama.train.optim import build_optimizer
    from cllama.train.steps import TrainStep

    dry_run = device == "Ascend" and not launched_by_msrun()
    if dry_run:  # MindSpore's DryRun: simulate rank 0 of the layout on this one host
        os.environ.setdefault("MS_SIMULATION_LEVEL", "1")
        os.environ["RANK_SIZE"], os.environ["RANK_ID"] = str(parallel.device_num), "0"
    init()
    from mindspore.communication import get_rank

    rank = get_rank()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file = out / f"strategy_rank_{rank}.ckpt"
    settings = auto_parallel_settings(parallel, {"parallel_mode": 1, "full_batch": True,
                                                 "enable_parallel_optimizer": optimizer_parallel},
                                      parallel.device_num, device, config)
    ms.set_auto_parallel_context(**settings, strategy_ckpt_config={"save_file": str(save_file),
                                                                   "only_trainable_params": False})
    with no_init_parameters():
        model = CodeLlama(config)
    if lora is not None:
        from cllama.checkpoint.adapter import add_lora

        add_lora(model, lora)
    model.shard(parallel)
    micro = parallel.micro_batch_num if parallel.pipeline_stage > 1 else 1
    step = TrainStep(model, build_optimizer({"type": "AdamW"}, model.trainable_params()), micro_batches=micro)
    ids = Tensor(np.ones((batch_size * parallel.data_parallel * micro, seq_length + 1), np.int32))
    step.compile(ids, ids, Tensor(0.0, ms.float32))
    stage = rank // (parallel.device_num // parallel.pipeline_stage)  # this rank compiled its stage only
    expected = {n: lay for n, lay in model_layouts(model).items() if lay.stage == stage}
    return {"strategy": str(save_file), "rank": rank, "stage": stage, "parameters": len(expected), "dry_run": dry_run,
            "differences": diff_layouts(expected, read_strategy(save_file))}
