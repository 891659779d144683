"""Training throughput: cllama's compiled train step vs transformers + torch.optim.AdamW (eager), and
LoRA finetuning vs transformers + peft + torch.optim.AdamW.

Same model config, batch and sequence length on both sides, in one run: a full optimizer step each
(forward, next-token cross-entropy over the 32016 vocabulary, backward, global-norm clipping at 1.0,
torch-style AdamW). Sides interleaved, best of `--reps` after warm-up; compile time reported apart.
Model FLOPs utilisation = model FLOPs per second over a float32 matmul peak measured in the same run
(torch.mm, 2048^3, best of 5). Model FLOPs per token = 6 * (parameters except the embedding table)
+ 6 * num_layers * seq_length * hidden_size (attention scores and values, forward + backward).

LoRA (`--lora-presets`): rank 8, alpha 16, adapters on wq/wk/wv/wo (q/k/v/o_proj), the base frozen,
AdamW on the adapters only, clipping over them; also the trainable parameters and optimizer-state bytes
against full finetuning of the same preset.

    python bench/train.py [--presets tiny,small] [--lora-presets small] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SHAPES = {"tiny": (8, 256), "small": (4, 256)}  # batch, sequence length
ADAMW = {"type": "AdamW", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best float32 matmul FLOP/s of torch.mm on this machine (all threads torch uses)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops_per_token(config, seq_length: int) -> float:
    embedding = config.vocab_size * config.hidden_size
    return 6 * (config.num_params() - embedding) + 6 * config.num_layers * seq_length * config.hidden_size


LORA = {"rank": 8, "alpha": 16.0, "targets": r".*wq|.*wk|.*wv|.*wo", "peft": ["q_proj", "k_proj", "v_proj", "o_proj"]}


class Cllama:
    def __init__(self, config, ids: np.ndarray, lora: bool = False) -> None:
        import mindspore as ms
        from mindspore import Tensor

        from cllama.checkpoint.adapter import add_lora
        from cllama.checkpoint.lora import LoraConfig
        from cllama.checkpoint.model_dir import random_model
        from cllama.train.optim import build_optimizer
        from cllama.train.steps import TrainStep

        model = random_model(config, seed=0)
        if lora:
            add_lora(model, LoraConfig(LORA["rank"], LORA["alpha"], 0.0, LORA["targets"]))
        model.set_train(True)
        self.optimizer = build_optimizer(ADAMW, model.trainable_params())
        self.trainable = sum(int(np.prod(p.shape)) for p in model.trainable_params())
        self.optimizer_bytes = sum(int(np.prod(p.shape)) * p.itemsize for p in self.optimizer.state())
        self.step = TrainStep(model, self.optimizer, max_grad_norm=1.0)
        self.ids = Tensor(ids, ms.int32)
        self.lr = Tensor(1e-4, ms.float32)

    def run(self, steps: int) -> float:
        loss = None
        for _ in range(steps):
            loss = self.step(self.ids, self.ids, self.lr)[0]
        return float(loss.asnumpy())


class Torch:
    def __init__(self, config, ids: np.ndarray, lora: bool = False) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "torch_dtype")}
        self.model = LlamaForCausalLM(LlamaConfig(**hf)).train()
        if lora:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                               lora_dropout=0.0, target_modules=LORA["peft"]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                     lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
        ids = torch.tensor(ids, dtype=torch.long)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:].reshape(-1)

    def run(self, steps: int) -> float:
        import torch

        loss = None
        for _ in range(steps):
            logits = self.model(input_ids=self.inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.targets)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        return float(loss.detach())


def bench_preset(name: str, reps: int, steps: int, peak: float, lora: bool = False) -> dict:
    from cllama.config import ModelConfig

    batch, seq = SHAPES[name]
    config = ModelConfig.from_name(name, seq_length=seq)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    sides = {"cllama": Cllama(config, ids, lora), "torch": Torch(config, ids, lora)}
    compile_s = {k: _timed(lambda s=s: s.run(1)) for k, s in sides.items()}  # warm-up (cllama: compile)
    for s in sides.values():
        s.run(1)
    best = {k: float("inf") for k in sides}
    for _ in range(reps):
        for k, s in sides.items():
            best[k] = min(best[k], _timed(lambda s=s: s.run(steps)) / steps)
    tokens = batch * seq
    flops = model_flops_per_token(config, seq) * tokens
    out = {"preset": name, "batch": batch, "seq": seq, "params": config.num_params(), "compile_s": compile_s,
           "trainable": sides["cllama"].trainable, "optimizer_bytes": sides["cllama"].optimizer_bytes}
    for k in sides:
        out[f"{k}_tok_s"] = tokens / best[k]
        out[f"{k}_mfu"] = flops / best[k] / peak
    out["ratio"] = best["torch"] / best["cllama"]
    print(f"{name}{' LoRA' if lora else ''}: {config.num_params() / 1e6:.1f}M params ({out['trainable']:,} trainable, "
          f"optimizer state {out['optimizer_bytes'] / 2**20:.1f} MiB), batch {batch} x seq {seq}: "
          f"cllama {out['cllama_tok_s']:,.0f} tok/s{_mfu(out, 'cllama', lora)}, "
          f"{'peft' if lora else 'torch'} {out['torch_tok_s']:,.0f} tok/s{_mfu(out, 'torch', lora)}, "
          f"ratio {out['ratio']:.2f}x; "
          f"first step (compile) cllama {compile_s['cllama']:.1f} s, torch {compile_s['torch']:.2f} s", flush=True)
    return out


def _mfu(out: dict, side: str, lora: bool) -> str:
    """MFU counts 6 FLOPs per parameter and token: not what a frozen base costs, so LoRA shows none."""
    return "" if lora else f" ({out[f'{side}_mfu']:.1%} MFU)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help="full finetuning presets ('' for none)")
    parser.add_argument("--lora-presets", default="small", help="LoRA presets ('' for none)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    args = parser.parse_args(argv)

    from cllama.runtime import init_context

    init_context("CPU", "graph")
    import torch

    peak = matmul_peak()
    print(f"float32 matmul peak (torch.mm 2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    results = [bench_preset(p, args.reps, args.steps, peak) for p in args.presets.split(",") if p]
    loras = [bench_preset(p, args.reps, args.steps, peak, lora=True) for p in args.lora_presets.split(",") if p]
    for r in results:
        print(f"RESULT train_{r['preset']}_vs_torch {r['ratio']:.2f}x (goal 1.0x)")
    for r in results:
        print(f"RESULT train_{r['preset']}_mfu {r['cllama_mfu']:.1%} (goal >= torch {r['torch_mfu']:.1%})")
    for r in loras:
        full = r["params"]  # full finetuning trains every parameter
        full_bytes = 8 * full + 4  # its AdamW state: two float32 moments per parameter + global_step
        print(f"RESULT train_lora_{r['preset']}_vs_peft {r['ratio']:.2f}x (goal 1.0x)")
        print(f"RESULT train_lora_{r['preset']}_trainable_params {r['trainable']:,} (goal < full {full:,})")
        print(f"RESULT train_lora_{r['preset']}_optimizer_bytes {r['optimizer_bytes']:,} (goal < full {full_bytes:,})")


if __name__ == "__main__":
    main()
