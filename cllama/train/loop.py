"""Pretraining, full finetuning and LoRA finetuning on MindSpore from a run YAML (cllama.train.runconfig).

`train(run)` trains in this process: on one device, or as one worker that msrun started
(cllama.train.launch starts them).
Outputs under `run.output_dir`: `metrics.jsonl` (one record per step, flushed as it goes),
`checkpoints/step_<N>/` (model directory + optimizer.ckpt + trainer_state.json; with
integrated_save: False and under semi-auto parallel every rank's slices in rank_K/ + strategy.ckpt,
see cllama.train.sharded) and `run_config.yaml` (the document the run used).

Failing loudly: every batch is checked before it is fed (cllama.train.batches: token ids within the
vocabulary, labels present when train_dataset.input_columns lists them). A diverging run stops: a
non-finite loss or gradient norm without loss scaling; with loss scaling a non-finite loss, or gradients
overflowing even at scale 1, on NONFINITE_PATIENCE consecutive steps (one skipped overflow step is loss
scaling working). The diverged step is neither logged nor checkpointed, `<output_dir>/failed.json`
records it, TrainingDiverged (RuntimeError: `cllama train` exits 1) is raised and summarize() reports
status "failed"; a new or resumed run removes the marker. An output_dir holding an earlier run is
resumed (`resume`) or refused, never mixed. metrics.jsonl stays strict JSON.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cllama.distributed.parallel import init_parallel
from cllama.train.batches import check_columns, check_length, check_token_ids, open_dataset, rank_batches
from cllama.train.metrics import read_metrics
from cllama.train.runconfig import RunConfig, save_run_config

MetricsCallback = Callable[[list], None]
log = logging.getLogger(__name__)
FAILED_MARKER = "failed.json"
NONFINITE_PATIENCE = 3  # with loss scaling: consecutive non-finite losses that stop the run


class TrainingDiverged(RuntimeError):
    """The loss (or, without loss scaling, the gradient norm) became non-finite; see the module docstring."""


@dataclass
class TrainResult:
    """What a finished run left behind (read back from its output directory)."""

    output_dir: str
    checkpoint: Optional[str]  # the newest step_<N>: a model directory
    metrics: str
    steps: int
    final_loss: Optional[float]
    loss_last10: Optional[float]
    first_loss: Optional[float]
    tokens_per_s: Optional[float]
    val_loss: Optional[float] = None
    val_perplexity: Optional[float] = None
    status: str = "completed"  # "failed": the run diverged (<output_dir>/failed.json)
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def headline(self) -> dict:
        """The figures a training stage reports in its results.json."""
        return {"final_loss": self.final_loss, "loss_last10": self.loss_last10, "first_loss": self.first_loss,
                "tokens_per_s": self.tokens_per_s, "steps": self.steps, "val_loss": self.val_loss,
                "val_perplexity": self.val_perplexity}

    def summary(self) -> str:
        """One line: loss from first to last step, throughput, validation loss."""
        if self.status != "completed":
            return f"{self.status}: {self.error}"
        return (f"loss {self.first_loss:.3f} -> {self.final_loss:.3f} (mean of last 10: {self.loss_last10:.3f}), "
                f"{self.tokens_per_s or 0:,.0f} tokens/s"
                + (f", val loss {self.val_loss:.3f}" if self.val_loss else ""))


# ---- data ----------------------------------------------------------------------------------------------
def _device(run: RunConfig) -> str:
    from cllama.runtime import detect_device, init_context

    if run.device == "CPU":
        return init_context("CPU", "graph", seed=run.seed)
    found = detect_device()
    want = found if run.device == "auto" else run.device
    if want != found:
        raise ValueError(f"{run.source}: context.device_target: {want} requested but this machine has "
                         f"{found}; set device_target: {found} (or auto) to run here")
    return init_context(want, "graph", seed=run.seed)


RUN_MODEL_KEYS = ("seq_length", "param_init_type", "compute_dtype", "layernorm_compute_type", "softmax_compute_type")


def _build_model(run: RunConfig, lazy: bool = False):
    """The model to train: random (seeded), or load_checkpoint's weights, with LoRA adapters (seeded)
    and its base frozen when the run has a pet_config. `lazy` (a semi-auto run that loads its slices
    after compiling) builds it without materialising any weights."""
    from cllama.checkpoint.adapter import add_lora
    from cllama.checkpoint.model_dir import load_model_dir, random_model
    from cllama.model import CodeLlama

    if lazy:
        from mindspore.nn.utils import no_init_parameters

        with no_init_parameters():
            model = CodeLlama(run.model)
    elif not run.load_checkpoint:
        model = random_model(run.model, seed=run.seed)
    else:  # the YAML's length and dtypes (a LoRA run's frozen base may stay float16/bfloat16)
        model = load_model_dir(run.load_checkpoint, **{k: getattr(run.model, k) for k in RUN_MODEL_KEYS})
    if run.lora is not None:
        add_lora(model, run.lora, seed=run.seed, source=f"{run.source}: model.model_config.pet_config")
    return model


def _check_start(run: RunConfig) -> None:
    """load_checkpoint must hold the model the YAML describes."""
    from cllama.config import ModelConfig

    path = Path(run.load_checkpoint)
    config = ModelConfig.load(path)
    for key in ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "vocab_size", "ffn_hidden_size"):
        if getattr(config, key) != getattr(run.model, key):
            raise ValueError(f"{run.source}: model.model_config.{key}={getattr(run.model, key)} but "
                             f"{path}/config.json has {getattr(config, key)}; make them agree")


def _tokenizer_file(run: RunConfig) -> Optional[Path]:
    if run.tokenizer:
        if not Path(run.tokenizer).is_file():
            raise FileNotFoundError(f"{run.source}: processor.tokenizer.vocab_file: {run.tokenizer} not found")
        return Path(run.tokenizer)
    if run.load_checkpoint and (Path(run.load_checkpoint) / "tokenizer.model").is_file():
        return Path(run.load_checkpoint) / "tokenizer.model"
    return None


def train(run: RunConfig, resume: Optional[bool] = None, progress: bool = True,
          on_metrics: Optional[MetricsCallback] = None, metrics_every: int = 10) -> Optional[TrainResult]:
    """Train as the run config says. Resumes from the newest complete checkpoint when `resume`
    (default: the YAML's resume_training) and one exists. `on_metrics(records)` is called with all
    records so far every `metrics_every` steps and at the end (rank 0). Returns the TrainResult on
    rank 0, None on other ranks.

    Under semi-auto parallel (Ascend) the model carries the parallel_config's strategies and
    pipeline stages, every rank reads the whole global batch (full_batch), saves its own slices
    (cllama.train.sharded) and MindSpore's strategy file is kept with each step."""
    import mindspore as ms
    from mindspore import Tensor
    from tqdm.auto import tqdm

    from cllama.checkpoint.files import check_model_dir
    from cllama.train.checkpoints import latest_checkpoint, remove_partial_checkpoints
    from cllama.train.metrics import MetricsLog
    from cllama.train.optim import build_lr_schedule, build_optimizer
    from cllama.train.sharded import SEMI_AUTO, run_strategy, strategy_save_config
    from cllama.train.steps import AccumulateStep, EvalStep, TrainStep

    if not run.train_data:
        raise ValueError(f"{run.source}: train_dataset.data_loader.dataset_dir is empty; point it at a "
                         "MindRecord file written by `cllama data ...`")
    if run.lora is not None and not run.load_checkpoint:
        raise ValueError(f"{run.source}: model.model_config.pet_config (LoRA) finetunes a base model; set "
                         "load_checkpoint to its model directory")
    if run.load_checkpoint:  # before any output is written
        check_model_dir(run.load_checkpoint, f"{run.source}: load_checkpoint: ")
        _check_start(run)
    device = _device(run)
    want_labels = run.run_mode == "finetune" and "labels" in run.input_columns  # before any output
    check_columns(run.train_data, want_labels, f"{run.source} (train_dataset.input_columns)")
    if run.eval_data:
        check_columns(run.eval_data, want_labels, f"{run.source} (train_dataset.input_columns)")
    env = init_parallel(run.parallel_config, run.parallel, run.model, device)  # no-op unless msrun started us
    if env.world == 1 and run.use_parallel and run.parallel_config.device_num > 1:
        raise ValueError(f"{run.source}: use_parallel with parallel_config for {run.parallel_config.device_num} "
                         "devices, but this is a single process; launch it with msrun (see `cllama train --check`)")
    semi = env.mode in SEMI_AUTO
    pc = run.parallel_config
    micro = pc.micro_batch_num if semi and pc.pipeline_stage > 1 else 1
    if semi and run.accumulate > 1:
        raise ValueError(f"{run.source}: runner_config.gradient_accumulation_steps: {run.accumulate} is not supported "
                         "under semi-auto parallel; set it to 1 and raise parallel_config.micro_batch_num (with "
                         "pipeline stages) or runner_config.batch_size")
    if semi and not run.parallel.get("full_batch", True):
        raise ValueError(f"{run.source}: parallel.full_batch: False is not supported; set it to True (every rank "
                         "reads the global batch and MindSpore splits it by the strategies)")
    out = Path(run.output_dir)
    ckpt_root = out / "checkpoints"
    resume = run.resume_training if resume is None else resume
    earlier = latest_checkpoint(ckpt_root)
    if not resume and (earlier is not None or (out / "metrics.jsonl").is_file()):  # never mix two runs
        held = f"checkpoint {earlier.name}" if earlier is not None else "metrics.jsonl"
        raise ValueError(f"{run.source}: output_dir {out} holds an earlier run ({held}); continue it with --resume "
                         "(resume_training: True) or choose a new output_dir")
    if env.world > 1:  # every rank has looked before rank 0 writes anything
        from cllama.train.sharded import barrier

        barrier(env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(ckpt_root)
        (out / FAILED_MARKER).unlink(missing_ok=True)  # this attempt decides the run's status
        save_run_config(run, out / "run_config.yaml")
    if semi:  # MindSpore writes each rank's strategy file when the step compiles
        ms.set_auto_parallel_context(strategy_ckpt_config=strategy_save_config(out.resolve(), env.rank,
                                                                               trainable_only=run.lora is None))

    latest = latest_checkpoint(ckpt_root) if resume else None
    model = _build_model(run, lazy=semi and bool(run.load_checkpoint or latest))
    if semi:
        model.shard(pc)
    model.set_train(True)
    if run.recompute or run.select_recompute:
        model.set_recompute(run.recompute, run.select_recompute, **run.recompute_options)
    optimizer = build_optimizer(run.optimizer, model.trainable_params())
    step_cell = TrainStep(model, optimizer, run.max_grad_norm, run.accumulate, run.loss_scale,
                          1 if semi else env.world, micro)
    accumulate_cell = AccumulateStep(step_cell) if run.accumulate > 1 else None
    tokenizer = _tokenizer_file(run)

    # semi-auto: every rank feeds the global batch; data parallel: each its share of it
    global_batch = run.batch_size * (pc.data_parallel * micro if semi else env.world)
    feed_rank, feed_world = (0, 1) if semi else (env.rank, env.world)
    per_epoch = open_dataset(run.train_data, global_batch, run.shuffle, run.seed).get_dataset_size()
    if per_epoch < run.accumulate:
        raise ValueError(f"{run.train_data[0]}: {per_epoch} batches of {global_batch} per epoch, fewer than "
                         f"gradient_accumulation_steps={run.accumulate}; lower batch_size or add data")
    total = run.max_steps if run.max_steps > 0 else run.epochs * per_epoch // run.accumulate
    repeat = max(run.epochs, math.ceil(total * run.accumulate / per_epoch))
    schedule = build_lr_schedule(run.lr_schedule, total, source=f"{run.source}: lr_schedule")

    sharded = semi or not run.integrated_save
    strategy = None
    if semi:  # compile first: the parameters are sliced and MindSpore has written the strategy files
        ids, labels = next(rank_batches(open_dataset(run.train_data, global_batch, False), 0, 1))
        check_token_ids(ids, labels, run.model.vocab_size, run.model.ignore_token_id, run.train_data)
        step_cell.compile(Tensor(ids, ms.int32), Tensor(ids, ms.int32), Tensor(0.0, ms.float32))
    if sharded:
        strategy = run_strategy(out, env, model, pc)
    start, samples = _restore(run, env, model, optimizer, step_cell, latest, semi, out, progress)
    if samples % global_batch:
        raise ValueError(f"{latest}: {samples} samples consumed is not a whole number of global batches "
                         f"of {global_batch}; resume with the batch size and worker count it was saved with")
    consumed = samples // global_batch  # global micro-batches
    batches = rank_batches(open_dataset(run.train_data, global_batch, run.shuffle, run.seed, repeat),
                           feed_rank, feed_world, skip=consumed)
    evaluate = None
    if run.eval_data and micro > 1 and env.is_main:
        log.warning("%s: no validation loss with pipeline stages (the eval graph would need its own "
                    "pipeline); eval_dataset is skipped", run.source)
    elif run.eval_data and (env.is_main or semi):  # semi-auto: every rank runs the (collective) eval graph
        evaluate = _evaluator(run, model, EvalStep)
    log_file = None
    if env.is_main:
        log_file = MetricsLog(out / "metrics.jsonl", after_step=start if latest is not None else None)
    records = list(read_metrics(out / "metrics.jsonl")) if env.is_main else []
    bar = tqdm(total=total, initial=start, disable=not (progress and env.is_main), desc="train", unit="step")
    seq_checked, last_state, nonfinite, at_floor = False, None, 0, 0
    vocab, ignore_id = run.model.vocab_size, run.model.ignore_token_id
    try:  # the bar ends its line and the metrics file is closed however the loop ends
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = schedule(step)
            micro_losses = []
            for _ in range(run.accumulate - 1):
                ids, labels = next(batches)
                check_token_ids(ids, labels, vocab, ignore_id, run.train_data)
                micro_losses.append(accumulate_cell(Tensor(ids, ms.int32), Tensor(labels, ms.int32)))
            ids, labels = next(batches)
            check_token_ids(ids, labels, vocab, ignore_id, run.train_data)
            if not seq_checked:
                check_length(run, ids, model.config.seq_length)
                seq_checked = True
            loss, norm, overflow, scale = step_cell(Tensor(ids, ms.int32), Tensor(labels, ms.int32),
                                                    Tensor(lr, ms.float32))
            loss = float(np.mean([float(x.asnumpy()) for x in micro_losses] + [float(loss.asnumpy())]))
            grad_norm = float(norm.asnumpy())
            seconds = time.perf_counter() - t0
            if run.loss_scale is None:  # the step has applied the update: non-finite weights from here on
                diverged = not (math.isfinite(loss) and math.isfinite(grad_norm))
            else:  # an overflow step is skipped (weights unchanged); only a persisting non-finite loss stops, or
                # gradients that overflow even at loss scale 1 (the scale cannot go lower: they are non-finite)
                nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
                at_floor = at_floor + 1 if bool(overflow.asnumpy()) and float(scale.asnumpy()) <= 1.0 else 0
                diverged = max(nonfinite, at_floor) >= NONFINITE_PATIENCE
            if diverged:
                _fail(run, env, out, ckpt_root, step + 1, loss, grad_norm, lr, max(nonfinite, at_floor))
            consumed += run.accumulate
            tokens = global_batch * run.accumulate * (ids.shape[1] - 1)
            record = {"step": step + 1, "epoch": consumed // per_epoch, "loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens / seconds, "seconds": seconds,
                      "tokens": tokens}
            if step == start:
                record["compile"] = True  # first step of this process: includes graph compilation
            if run.loss_scale is not None:
                record.update(loss_scale=float(scale.asnumpy()), overflow=bool(overflow.asnumpy()))
            last = step + 1 == total
            if evaluate is not None and ((step + 1) % run.eval_interval == 0 or last):
                record["val_loss"] = evaluate()
                record["val_perplexity"] = math.exp(min(record["val_loss"], 80.0))
            last_state = {"step": step + 1, "epoch": consumed // per_epoch, "samples_consumed": consumed * global_batch,
                          "seed": run.seed, "lr": lr, "next_lr": schedule(step + 1), "loss": loss,
                          "loss_scale": float(scale.asnumpy()), "total_steps": total, "global_batch_size": global_batch,
                          "gradient_accumulation_steps": run.accumulate, "world": env.world,
                          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if env.is_main:
                log_file.write(record)
                records.append(record)
            if (run.save_steps and (step + 1) % run.save_steps == 0) or last:
                _save(run, env, ckpt_root, model, optimizer, step_cell, last_state, tokenizer, strategy)
            if env.is_main and on_metrics is not None and ((step + 1) % metrics_every == 0 or last):
                on_metrics(records)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if not env.is_main:
        return None
    if start >= total and on_metrics is not None:
        on_metrics(records)
    return summarize(out)


def _fail(run: RunConfig, env, out: Path, ckpt_root: Path, step: int, loss: float, grad_norm: float, lr: float,
          repeats: int) -> None:
    """Write the failed marker (rank 0) and raise TrainingDiverged; nothing of this step is saved."""
    from cllama.fileio import write_json
    from cllama.train.checkpoints import latest_checkpoint

    latest = latest_checkpoint(ckpt_root)
    what = f"loss {loss}, gradient norm {grad_norm}" if run.loss_scale is None else \
        f"loss {loss}, gradient norm {grad_norm} (overflow even at loss scale 1, or a non-finite loss) on " \
        f"{repeats} consecutive steps (loss scaling)"
    error = (f"{run.source}: training diverged at step {step}: {what} at learning rate {lr:.3g}; stopped without "
             f"saving this step (newest finite checkpoint: {latest or 'none'}); lower lr_schedule.learning_rate, "
             "raise warmup, keep runner_wrapper.use_clip_grad, or check the data")
    if env.is_main:
        write_json(out / FAILED_MARKER, {"status": "failed", "step": step, "loss": loss, "grad_norm": grad_norm,
                                          "lr": lr, "error": error, "checkpoint": str(latest) if latest else None})
    raise TrainingDiverged(error)


def _restore(run: RunConfig, env, model, optimizer, step_cell, latest: Optional[Path], semi: bool, out: Path,
             progress: bool) -> tuple[int, int]:
    """Load what the run starts from: the newest checkpoint when resuming (a model directory + optimizer
    state, or this rank's slices of a sharded step), else, under semi-auto parallel, this rank's slices
    of load_checkpoint split into the run's layout. Returns (step, samples consumed)."""
    from cllama.fileio import read_json
    from cllama.train.checkpoints import TRAINER_STATE, load_checkpoint_state, load_state
    from cllama.train.sharded import check_resumable, is_sharded_step, load_rank_slices, split_for_run

    if latest is not None:
        if is_sharded_step(latest):
            state = read_json(latest / TRAINER_STATE, "trainer_state.json")
            check_resumable(latest, state, env)
            load_rank_slices(model, latest, env, optimizer, step_cell)
        else:
            from cllama.checkpoint.adapter import trained_params
            from cllama.checkpoint.files import weights_file
            from cllama.checkpoint.lora import adapter_file

            if semi:
                raise ValueError(f"{latest}: a whole-model checkpoint cannot resume a semi-auto parallel run; "
                                 f"start a new run with load_checkpoint: {latest}")
            weights = adapter_file(latest) if run.lora is not None else weights_file(latest)
            load_state(list(trained_params(model).values()), weights)
            state = load_checkpoint_state(latest, optimizer, step_cell)
        return state["step"], state["samples_consumed"]
    if semi and run.load_checkpoint:
        strategy = Path(out) / "strategy" / "strategy.ckpt"
        from cllama.checkpoint.model_dir import state_dict

        load_rank_slices(model, split_for_run(run.load_checkpoint, strategy, out, env, progress), env,
                         params=state_dict(model))
    return 0, 0


def _save(run: RunConfig, env, root: Path, model, optimizer, step_cell, state: dict, tokenizer, strategy) -> None:
    """A whole-model checkpoint from rank 0, or every rank's slices (integrated_save: False, semi-auto)."""
    from cllama.train.checkpoints import save_checkpoint
    from cllama.train.sharded import save_sharded

    if strategy is not None:
        save_sharded(root, env, model, optimizer, step_cell, state, strategy, tokenizer, run.keep_checkpoints,
                     run.checkpoint_format, run.load_checkpoint)
    elif env.is_main:
        save_checkpoint(root, model, optimizer, step_cell, state, tokenizer, run.keep_checkpoints,
                        run.checkpoint_format, run.load_checkpoint)


def _evaluator(run: RunConfig, model, eval_cell_type) -> Callable[[], float]:
    """Mean loss over the validation set (first eval_batches batches when set), no shuffling."""
    import mindspore as ms
    from mindspore import Tensor

    cell = eval_cell_type(model)
    batch = min(run.batch_size, open_dataset(run.eval_data, 1, False).get_dataset_size())

    def evaluate() -> float:
        model.set_train(False)
        losses = []
        for i, (ids, labels) in enumerate(rank_batches(open_dataset(run.eval_data, batch, False), 0, 1)):
            if run.eval_batches and i >= run.eval_batches:
                break
            check_token_ids(ids, labels, run.model.vocab_size, run.model.ignore_token_id, run.eval_data)
            losses.append(float(cell(Tensor(ids, ms.int32), Tensor(labels, ms.int32)).asnumpy()))
        model.set_train(True)
        return float(np.mean(losses))

    return evaluate


# ---- results ----------------------------------------------------------------------------------------------
def summarize(output_dir: str | os.PathLike) -> TrainResult:
    """Final loss, tokens/s (steps that did not compile), validation figures and the newest
    checkpoint of a run directory; status "failed" (and the error) when it has a failed marker."""
    from cllama.fileio import read_json
    from cllama.train.checkpoints import latest_checkpoint

    out = Path(output_dir)
    records = read_metrics(out / "metrics.jsonl")
    failed = read_json(out / FAILED_MARKER, FAILED_MARKER) if (out / FAILED_MARKER).is_file() else None
    if not records and failed is None:
        raise FileNotFoundError(f"{out}/metrics.jsonl: no training records; did the run start?")
    status = {"status": "failed", "error": failed.get("error")} if failed else {}
    latest = latest_checkpoint(out / "checkpoints")
    if not records:
        return TrainResult(output_dir=str(out), checkpoint=str(latest) if latest else None,
                           metrics=str(out / "metrics.jsonl"), steps=0, final_loss=None, loss_last10=None,
                           first_loss=None, tokens_per_s=None, **status)
    losses = [r["loss"] for r in records[-10:] if r.get("loss") is not None]
    timed = [r for r in records if not r.get("compile")]
    tokens_per_s = (sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed)) if timed else None
    evals = [r for r in records if "val_loss" in r]
    return TrainResult(
        output_dir=str(out), checkpoint=str(latest) if latest else None, metrics=str(out / "metrics.jsonl"),
        steps=records[-1]["step"], final_loss=records[-1]["loss"], first_loss=records[0]["loss"],
        loss_last10=float(np.mean(losses)) if losses else None, tokens_per_s=tokens_per_s,
        val_loss=evals[-1]["val_loss"] if evals else None,
        val_perplexity=evals[-1]["val_perplexity"] if evals else None, **status)
