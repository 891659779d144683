"""Matplotlib figures for the notebooks; each function returns the Figure and can save a PNG."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cllama.fileio import atomic_path


def save_figure(fig, path: str | os.PathLike | None) -> Path | None:
    """Save `fig` as PNG (atomically) when a path is given; returns the path."""
    if path is None:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def plot_humaneval(metrics: Mapping[str, float], label: str = "this run",
                   protocol: str = "humaneval/unstripped/greedy", preset: str | None = None,
                   path: str | os.PathLike | None = None):
    """pass@1 (%) of this run beside the Code Llama paper's for the benchmark of `protocol`
    (cllama.evaluation.protocols: HumanEval's 9 checkpoints and MindFormers' 34B, infilling's 7B/13B
    PSM, MBPP's 7B/13B/34B) and this run's pass@k. With `preset` (the model this run evaluates) the
    paper's figure for the same model and protocol is named in the title with the difference.
    metrics holds fractions, e.g. {"pass@1": 0.12, "pass@10": 0.3}."""
    import matplotlib.pyplot as plt

    from cllama.evaluation import protocols as pr

    benchmark = protocol.split("/")[0]
    if benchmark == "humaneval_infilling":
        kind = protocol.split("/")[1]
        ref = {f"{name} (paper)": v[kind] for name, v in pr.PAPER_INFILLING_PASS_AT_1.items()}
    elif benchmark == "mbpp":
        ref = {f"{name} (paper)": v for name, v in pr.PAPER_MBPP_PASS_AT_1.items()}
    else:
        ref = {f"{name} (paper)": v for name, v in pr.PAPER_PASS_AT_1.items()}
        ref["codellama-34b (MindFormers)"] = pr.MINDFORMERS_34B_PASS_AT_1
    title = f"{protocol} pass@1"
    ours = 100 * metrics.get("pass@1", 0.0)
    paper = pr.paper_figure(preset, protocol)
    if paper is not None:
        title += f"\n{label}: {ours:.1f} vs the paper's {paper:g} for {preset} ({ours - paper:+.1f})"
    elif preset:
        title += f"\n(the paper has no {protocol} figure for {preset})"
    names = list(ref) + [label]
    values = list(ref.values()) + [ours]
    ks = sorted((k for k in metrics if k.startswith("pass@")), key=lambda k: int(k[5:]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    colors = ["#9aa5b1"] * len(ref) + ["#d9480f"]
    bars = left.barh(names, values, color=colors)
    left.bar_label(bars, labels=[f"{v:g}" for v in values[:-1]] + [f"{values[-1]:.1f}"], padding=2, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("pass@1 (%)")
    left.set_xlim(0, 100)
    left.set_title(title)
    right.bar_label(right.bar(ks, [100 * metrics[k] for k in ks], color="#d9480f"), fmt="%.1f", fontsize=8)
    right.set_ylim(0, 100)
    right.set_ylabel("%")
    right.set_title(f"{label}: pass@k")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def memory_per_rank_bars(computed: list[int], measured: list[int] | None = None,
                         stages: list[int] | None = None, title: str = "weights per rank",
                         path: str | os.PathLike | None = None):
    """Bar chart of weight memory per rank in MiB: what the layout implies (`computed`) and, when
    given, the shard files' sizes on disk (`measured`); bars are coloured by pipeline stage."""
    import matplotlib.pyplot as plt

    ranks = list(range(len(computed)))
    stages = list(stages) if stages is not None else [0] * len(computed)
    colors = [plt.cm.tab10(s % 10) for s in stages]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(ranks) + 2), 3.2))
    width = 0.4 if measured is not None else 0.7
    offset = -width / 2 if measured is not None else 0.0
    ax.bar([r + offset for r in ranks], [b / 2**20 for b in computed], width, color=colors, label="layout")
    if measured is not None:
        ax.bar([r + width / 2 for r in ranks], [b / 2**20 for b in measured], width, color=colors,
               alpha=0.45, hatch="//", label="shard file")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(ranks)
    ax.set_xlabel("rank")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    if len(set(stages)) > 1:
        top = max(max(computed), max(measured or [0])) / 2**20
        ax.set_ylim(0, top * 1.15)
        for s in sorted(set(stages)):
            first, last = stages.index(s), len(stages) - 1 - stages[::-1].index(s)
            ax.text((first + last) / 2, top * 1.05, f"stage {s}", ha="center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def memory_plan_bars(rows: list[dict], usable_gb: float, title: str = "memory per rank",
                     path: str | os.PathLike | None = None, limit: int = 12):
    """Stacked bars of a memory plan (cllama.distributed.planner.plan_table rows, GB per rank by kind)
    for the first `limit` layouts, with the usable device memory as a line."""
    import matplotlib.pyplot as plt

    rows = rows[:limit]
    kinds = ("weights", "gradients", "optimizer", "activations")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(rows) + 2), 3.6))
    bottom = [0.0] * len(rows)
    for i, kind in enumerate(kinds):
        values = [r[kind] for r in rows]
        ax.bar(range(len(rows)), values, 0.65, bottom=bottom, color=plt.cm.tab10(i), label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(usable_gb, color="black", linestyle="--", linewidth=1)
    ax.text(len(rows) - 0.5, usable_gb, f" usable {usable_gb:g} GB", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["layout"] + ("" if r["fits"] else "\n(no fit)") for r in rows], fontsize=7)
    ax.set_ylabel("GB per rank")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def token_length_histogram(lengths, sample_length: int | None = None, title: str = "token lengths",
                           path: str | os.PathLike | None = None):
    """Histogram of examples' / documents' token lengths (log-spaced bins when they span a wide
    range), with the dataset's sample length (seq_length+1) marked and the share above it."""
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.asarray(lengths)
    lengths = lengths[lengths > 0]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if len(lengths) == 0:
        ax.text(0.5, 0.5, "no lengths", ha="center", va="center", transform=ax.transAxes)
        return fig
    lo, hi = int(lengths.min()), int(lengths.max())
    log = hi > 50 * max(lo, 1)
    bins = np.geomspace(max(lo, 1), hi + 1, 40) if log else min(40, hi - lo + 1)
    ax.hist(lengths, bins=bins, color="#4c72b0")
    if log:
        ax.set_xscale("log")
    if sample_length is not None:
        over = float((lengths > sample_length).mean())
        ax.axvline(sample_length, color="#c44e52", linestyle="--",
                   label=f"sample length {sample_length} ({over:.1%} longer)")
        ax.legend(loc="upper right")
    ax.set_xlabel("tokens")
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={len(lengths)}, median {int(np.median(lengths))})")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def loss_curve(records, title: str = "training loss", path: str | os.PathLike | None = None):
    """Training loss per step (with a running mean), validation loss as markers and the learning
    rate on a second axis, from metrics.jsonl records (`cllama.train.metrics.read_metrics`)."""
    import matplotlib.pyplot as plt
    import numpy as np

    records = list(records)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if records:
        steps = np.array([r["step"] for r in records])
        loss = np.array([r["loss"] for r in records])
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
        window = max(1, len(loss) // 20)
        if window > 1:
            mean = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], mean, color="tab:blue", lw=2, label=f"mean of {window}")
        evals = [r for r in records if "val_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                    label="validation")
        lr = ax.twinx()
        lr.plot(steps, [r["lr"] for r in records], color="tab:gray", lw=1, ls="--")
        lr.set_ylabel("learning rate", color="tab:gray")
        lr.tick_params(axis="y", colors="tab:gray")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


class LiveLossCurve:
    """Redraws `loss_curve` in one notebook output as records arrive: pass an instance as
    `train(..., on_metrics=...)` or `launch(..., on_metrics=...)`."""

    def __init__(self, title: str = "training loss") -> None:
        self.title = title
        self.handle = None

    def __call__(self, records) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig = loss_curve(records, self.title)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def compare_loss_curves(curves: Mapping[str, list], title: str = "training loss across runs",
                        path: str | os.PathLike | None = None):
    """Overlay loss curves: {label: metrics.jsonl records}, one colour per label (a running mean
    over the raw loss), validation losses as markers of the same colour."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (label, records) in enumerate(curves.items()):
        records = [r for r in records if "loss" in r]
        if not records:
            continue
        color = plt.cm.tab10(i % 10)
        steps, loss = np.array([r["step"] for r in records]), np.array([r["loss"] for r in records])
        window = max(1, len(loss) // 20)
        ax.plot(steps, loss, color=color, alpha=0.25, lw=1)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid") if window > 1 else loss
        ax.plot(steps[window - 1:], smooth, color=color, lw=2, label=label)
        evals = [r for r in records if r.get("val_loss") is not None]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o", color=color, ms=4)
    if not curves:
        ax.text(0.5, 0.5, "no training stages in the chosen runs", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (dots: validation)")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
