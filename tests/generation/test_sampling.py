"""Host-side token selection against references: a sort-based numpy top-k/top-p written here and
transformers' own logits processors; sampled frequencies against the filtered softmax."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from cllama.generation.sampling import SamplingParams, apply_repetition_penalty, filter_logits, select_tokens


def reference_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Row by row: keep the top_k best (0: all), then the fewest best whose probability reaches top_p."""
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")[:top_k or len(row)]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        kept = 1 + int(np.searchsorted(np.cumsum(probs), top_p)) if top_p < 1 else len(order)
        keep = order[:min(kept, len(order))]
        out[r, keep] = row[keep]
    return out


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (0, 0.5), (20, 0.8), (1, 1.0), (0, 1e-6)])
def test_filter_matches_references(rng, top_k, top_p):
    logits = rng.normal(0, 3, (4, 300)).astype(np.float32)
    got = filter_logits(logits, top_k, top_p)
    assert np.array_equal(np.isfinite(got), np.isfinite(reference_filter(logits, top_k, top_p)))
    assert np.array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])
    torch_logits = torch.tensor(logits)
    if top_k:
        torch_logits = TopKLogitsWarper(top_k)(None, torch_logits)
    if top_p < 1:
        torch_logits = TopPLogitsWarper(top_p)(None, torch_logits)
    assert np.array_equal(np.isfinite(got), torch.isfinite(torch_logits).numpy())


def test_repetition_penalty_matches_transformers(rng):
    logits = rng.normal(0, 2, (3, 50)).astype(np.float32)
    seen = [np.array([1, 2, 2, 7]), np.array([49]), np.array([0, 10, 20, 30, 40])]
    got = apply_repetition_penalty(logits, seen, 1.7)
    width = max(len(s) for s in seen)
    ids = torch.tensor(np.stack([np.pad(s, (0, width - len(s)), mode="edge") for s in seen]))
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, torch.tensor(logits)).numpy()
    assert np.allclose(got, want, rtol=0, atol=1e-6)
    assert np.array_equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_sampled_frequencies_follow_the_filtered_softmax():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
    params = SamplingParams(temperature=1.0, top_k=3)
    rng = np.random.default_rng(0)
    draws = np.array([select_tokens(logits, params, rng)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=5) / len(draws)
    want = np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85
    assert np.abs(freq - want).max() < 0.015
    hot = SamplingParams(temperature=2.0, top_p=0.5)  # T=2 flattens: 0.5**.5 / sum(p**.5) < 0.5, so two are kept
    draws = np.array([select_tokens(logits, hot, rng)[0] for _ in range(5000)])
    assert set(draws) == {0, 1}


def test_greedy_and_seeds(rng):
    logits = rng.normal(0, 1, (6, 40)).astype(np.float32)
    assert np.array_equal(select_tokens(logits, SamplingParams(), rng), logits.argmax(-1))
    assert np.array_equal(select_tokens(logits, SamplingParams(temperature=1.0, top_k=1), rng), logits.argmax(-1))
    hot = SamplingParams(temperature=1.5)
    draw = [select_tokens(logits, hot, np.random.default_rng(seed)) for seed in (3, 3, 4)]
    assert np.array_equal(draw[0], draw[1]) and not np.array_equal(draw[0], draw[2])


def test_params_are_checked_and_built():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(repetition_penalty=0),
                dict(max_new_tokens=0), dict(stop="\n")):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    params = SamplingParams.build(SamplingParams(top_p=0.9), max_new_tokens=7, stop=["", "\ndef"])
    assert params.top_p == 0.9 and params.max_new_tokens == 7 and params.stop == ("\ndef",)
    assert params.greedy and not params.needs_logits and SamplingParams(repetition_penalty=1.1).needs_logits
    with pytest.raises(TypeError, match="unknown sampling settings"):
        SamplingParams.build(temprature=0.5)
