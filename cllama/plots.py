"""Matplotlib figures for the notebooks; each function returns the Figure and can save a PNG."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def save_figure(fig, path: str | os.PathLike | None) -> Path | None:
    """Save `fig` as PNG (atomically) when a path is given; returns the path."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_humaneval(metrics: Mapping[str, float], label: str = "this run", infilling: str | None = None,
                   path: str | os.PathLike | None = None):
    """HumanEval pass@1 (%) of this run beside the Code Llama paper's (the 9 checkpoints and
    MindFormers' 34B; for infilling, the paper's 7B/13B single-/multi-line PSM numbers), and this
    run's pass@k. metrics holds fractions, e.g. {"pass@1": 0.12, "pass@10": 0.3}."""
    import matplotlib.pyplot as plt

    from cllama.humaneval import MINDFORMERS_34B_PASS_AT_1, PAPER_INFILLING_PASS_AT_1, PAPER_PASS_AT_1

    if infilling:
        ref = {f"{name} (paper)": v[infilling] for name, v in PAPER_INFILLING_PASS_AT_1.items()}
        title = f"HumanEval {infilling} infilling pass@1"
    else:
        ref = {f"{name} (paper)": v for name, v in PAPER_PASS_AT_1.items()}
        ref["codellama-34b (MindFormers)"] = MINDFORMERS_34B_PASS_AT_1
        title = "HumanEval pass@1 (greedy)"
    names = list(ref) + [label]
    values = list(ref.values()) + [100 * metrics.get("pass@1", 0.0)]
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
