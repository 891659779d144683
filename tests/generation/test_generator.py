"""Generation: greedy ids equal transformers' generate, infill layouts and EOT, stops, sampling,
streaming, errors, the CLI contract. Graphs compile once per module through fixtures."""
import json
import shutil

import pytest
import torch
from mindspore import Tensor

from cllama.checkpoint.model_dir import random_model
from cllama.config import ModelConfig
from cllama.evaluation.humaneval import STOP_SEQUENCES
from cllama.generation.engine import batch_bucket, cache_bucket, prompt_bucket
from cllama.generation.generator import Generator, pipeline
from cllama.generation.sampling import SamplingParams
from cllama.generation.textstream import RowText
from cllama.tokenizer import Tokenizer

EOT = 32010


@pytest.fixture(scope="module")
def tok(codellama_tokenizer_path):
    return Tokenizer(codellama_tokenizer_path)


@pytest.fixture(scope="module")
def gen(tok):
    return Generator(random_model(ModelConfig.from_name("tiny", seq_length=512), seed=0), tok)


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir(seq_length=512)  # gen's weights


# ---- parity with transformers ----------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fused_weights", "model_weights"])
def test_greedy_batch_equals_transformers_generate(hf_llama, ms_llama, rng, fused):
    """48 new tokens for 3 prompts of different lengths, both left-padded with the padding
    masked. No eos: both sides must run all 48 steps."""
    prompts = [list(rng.integers(3, 32000, n)) for n in (5, 17, 11)]
    out = Generator(ms_llama, fused_weights=fused).generate(prompts, max_new_tokens=48, ignore_eos=True)
    width = max(map(len, prompts))
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        ref = hf_llama.generate(ids, attention_mask=mask, max_new_tokens=48, min_new_tokens=48,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    for i, g in enumerate(out):
        assert g.prompt_ids == [int(t) for t in prompts[i]]
        assert g.finish_reason == "length" and len(g.output_ids) == 48
        assert g.output_ids == ref[i, width:].tolist()


def test_compiled_steps_are_reused_across_buckets(gen, tok):
    """Two cache buckets alternate; each keeps its own cache and compiled cells, and a request
    leaves nothing behind in its cache for the next (decode adds into slots prefill zeroed)."""
    prompt = tok.encode("def add(a, b):")
    short = gen.generate([prompt], max_new_tokens=40, ignore_eos=True)[0].output_ids
    cells = gen.engine.steps_for(1, 128, False)
    other = gen.generate([tok.encode("import os")], max_new_tokens=60, ignore_eos=True)[0].output_ids
    gen.generate([list(range(100, 260))], max_new_tokens=8)  # 160 ids: width 256, cache 384
    assert gen.stats["cache_length"] == 384 and (1, 384, False) in gen.engine._steps
    again = gen.generate([prompt], max_new_tokens=40, ignore_eos=True)[0].output_ids
    assert short == again and other != short and gen.stats["cache_length"] == 128
    assert gen.engine.steps_for(1, 128, False) is cells  # the same compiled cells, no new bucket


def test_more_prompts_than_batch_size(gen, tok):
    """5 prompts in batches of 2 (grouped by length) equal each prompt generated alone."""
    texts = ["def a():", "import os, sys, re", "x = 1", "class Foo(object):\n    pass", "print"]
    prompts = [tok.encode(t) for t in texts]
    seen = []
    out = gen.generate(prompts, max_new_tokens=6, batch_size=2, ignore_eos=True,
                       on_text=lambda i, piece: seen.append(i))
    assert gen.stats["batch"] == 1 and sorted(set(seen)) == [0, 1, 2, 3, 4]
    for p, g in zip(prompts, out):
        assert g.prompt_ids == p and g.output_ids == gen.generate([p], max_new_tokens=6, ignore_eos=True)[0].output_ids


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 129, 433)] == [16, 16, 32, 128, 256, 512]
    assert cache_bucket(433 + 512, 2048) == 1024 and cache_bucket(3000, 2048) == 2048


# ---- infilling ---------------------------------------------------------------------------------
def test_infill_prompt_layouts(gen, tok):
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    psm = [tok.bos_id, 32007] + tok.encode(prefix, bos=False) + [32008] + \
        tok.encode_infilling(suffix) + [32009]
    spm = [tok.bos_id, 32007, 32008] + tok.encode_infilling(suffix) + [32009] + tok.encode(prefix, bos=False)
    assert gen.prompt_for(prefix, "infill", suffix) == (psm, [32010])
    assert gen.prompt_for(prefix, "infill", suffix, suffix_first=True) == (spm, [32010])
    assert tok.encode_infilling(suffix)[0] != tok.encode(suffix, bos=False)[0]  # no dummy space


def test_infill_stops_at_eot(tok):
    """A model whose EOT logit copies (x1.05) the logit of the 5th greedy token: EOT wins
    exactly there, and the middle is the first four tokens."""
    model = random_model(ModelConfig.from_name("tiny", seq_length=256), seed=1)
    g = Generator(model, tok)
    prompt = g.prompt_for("def f(x):\n    ", "infill", "\n    return y\n")[0]
    free = g.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].output_ids
    assert EOT not in free[:5]
    weight = model.lm_head.weight
    table = weight.asnumpy()
    table[EOT] = table[free[4]] * 1.05
    weight.set_data(Tensor(table))
    assert g.generate([prompt], max_new_tokens=8, ignore_eos=True)[0].output_ids == free  # a copy: unchanged
    g = Generator(model, tok)  # reads the new weights
    out = g.generate([prompt], max_new_tokens=8, stop_ids=[EOT])[0]
    assert out.output_ids == free[:4] and out.finish_reason == "eos"
    assert g.infill("def f(x):\n    ", "\n    return y\n", max_new_tokens=8) == \
        g.decode(free[:4])


def test_infill_without_pieces_is_refused(llama2_tokenizer_path, tok):
    plain = Generator(random_model(ModelConfig.from_name("tiny", vocab_size=32000, seq_length=256)),
                      Tokenizer(llama2_tokenizer_path))
    with pytest.raises(ValueError, match="no infilling pieces"):
        plain.infill("a", "b")
    small_vocab = Generator(random_model(ModelConfig.from_name("tiny", vocab_size=32000, seq_length=256)), tok)
    with pytest.raises(ValueError, match="cannot infill"):
        small_vocab.infill("a", "b")


# ---- stops, sampling, streaming ------------------------------------------------------------------
def test_stop_strings_cut_at_the_first_stop(gen, tok):
    prompt = tok.encode("def fib(n):")
    full = gen.generate([prompt], max_new_tokens=40, ignore_eos=True)[0]
    pieces = [gen.decode(full.output_ids[:k]) for k in range(len(full.output_ids) + 1)]
    k = next(k for k in range(6, 30) if len(pieces[k]) >= 3 and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    boundary = len(pieces[k])
    stop = full.text[boundary - 2:boundary + 2]  # spans two tokens
    cut = full.text.find(stop)
    later = full.text[boundary + 8:boundary + 11]
    for stops in ([stop], [later, stop]):
        out = gen.generate([prompt], max_new_tokens=40, stop=stops, ignore_eos=True)[0]
        assert out.finish_reason == "stop" and out.text == full.text[:cut]
        assert out.output_ids == full.output_ids[:len(out.output_ids)]
        assert full.text[:cut].startswith(gen.decode(out.output_ids))
        assert len(gen.decode(full.output_ids[:len(out.output_ids) + 1])) > cut
    assert gen.complete(["def fib(n):"], max_new_tokens=40, stop=[stop]) == [full.text[:cut]]


def test_humaneval_stops_and_row_text():
    row = RowText(lambda ids: "".join(ids), STOP_SEQUENCES)
    assert not row.add(["    return a", "\n"])
    assert row.release() == "    return a"  # "\n" could start a stop string
    assert row.add(["    return a", "\n", "if x"]) and row.text == "    return a"
    assert row.release(final=True) == ""


def test_seeded_sampling_is_reproducible(gen, tok):
    prompts = [tok.encode("def fib(n):"), tok.encode("import os")]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [g.output_ids for g in gen.generate(prompts, params, ignore_eos=True)]
    b = [g.output_ids for g in gen.generate(prompts, params, ignore_eos=True)]
    c = [g.output_ids for g in gen.generate(prompts, params, seed=8, ignore_eos=True)]
    greedy = [g.output_ids for g in gen.generate(prompts, max_new_tokens=24, ignore_eos=True)]
    assert a == b and a != c and a != greedy


def test_repetition_penalty_changes_greedy(gen, tok):
    prompt = [tok.encode("def fib(n):")]
    plain = gen.generate(prompt, max_new_tokens=24, ignore_eos=True)[0].output_ids
    penalised = gen.generate(prompt, max_new_tokens=24, repetition_penalty=1.0 + 1e-7, ignore_eos=True)
    assert penalised[0].output_ids == plain  # logits path == in-graph argmax path
    strong = gen.generate(prompt, max_new_tokens=24, repetition_penalty=50.0, ignore_eos=True)[0]
    seen = set(prompt[0])
    for t in strong.output_ids:  # a huge penalty never repeats while fresh tokens exist
        assert t not in seen
        seen.add(t)


def test_stream_concatenation_equals_final_text(gen):
    for kw in (dict(), dict(stop=["e", "\n"]), dict(mode="infill", suffix="\n    return y\n"),
               dict(mode="chat", system="Be brief.")):
        stream = gen.stream("def fib(n):", max_new_tokens=30, **kw)
        assert stream.generation is None  # nothing runs before the iteration
        pieces = list(stream)
        final = stream.generation
        assert "".join(pieces) == final.text
        assert kw.get("mode") != "chat" or final.text == final.text.lstrip()  # a chat answer's space is dropped
        assert len(pieces) > 1 or final.finish_reason != "length"


def test_row_text_multibyte_and_leading_spaces(tok, gen):
    """Real byte-fallback pieces (😀 is four <0x..> pieces) and '▁▁▁▁' indentation."""
    ids = tok.encode_infilling("\n    return 'é€😀'  # ok")
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)
    row, pieces = RowText(gen.decode, ["# o"]), []
    for k in range(1, len(ids) + 1):
        stopped = row.add(ids[:k])
        pieces.append(row.release(final=stopped or k == len(ids)))
        assert "\ufffd" not in pieces[-1]
        if stopped:
            break
    assert "".join(pieces) == row.text == "\n    return 'é€😀'  "
    assert gen.decode(tok.encode("    x", bos=False)) == "     x"  # ▁ kept: 4 spaces + dummy one


# ---- errors ------------------------------------------------------------------------------------
def test_clear_errors(gen, tok):
    with pytest.raises(ValueError, match="empty batch"):
        gen.generate([])
    with pytest.raises(ValueError, match="empty batch"):
        gen.complete([])
    with pytest.raises(ValueError, match="maximum length 512"):
        gen.generate([[1] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="outside the model's vocab"):
        gen.generate([[1, 40000]])
    with pytest.raises(ValueError, match="expected 'assistant'"):
        gen.chat([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]])
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate([[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1, 2]], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Generator(gen.model).complete(["x"])


# ---- from_dir, pipeline, CLI ----------------------------------------------------------------------
def test_from_dir_and_pipeline(model_dir, gen):
    loaded = Generator.from_dir(model_dir)
    want = gen.complete(["def fib(n):"], max_new_tokens=12)[0]
    assert loaded.complete(["def fib(n):"], max_new_tokens=12) == [want]
    pipe = pipeline("text_generation", model=loaded)
    assert pipe("def fib(n):", max_new_tokens=12) == [{"text_generation_text": ["def fib(n):" + want]}]


def test_cli_generate_json(model_dir, capsys):
    from cllama.cli import main

    assert main(["generate", "--model", str(model_dir), "--prompt", "def fib(n):", "--max-new-tokens",
                 "12", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prompt_ids"][0] == 1 and len(doc["output_ids"]) <= 12 and isinstance(doc["text"], str)
    ids = ",".join(map(str, doc["prompt_ids"]))
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", ids, "--max-new-tokens", "12",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["output_ids"] == doc["output_ids"] and again["text"] == doc["text"]
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--mode", "chat",
                 "--max-new-tokens", "4000"]) == 2
    assert "maximum length" in capsys.readouterr().err


def test_cli_prompt_ids_without_tokenizer_and_streaming(model_dir, tmp_path, capsys):
    from cllama.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.ckpt"):
        shutil.copyfile(model_dir / name, bare / name)
    assert main(["generate", "--model", str(bare), "--prompt-ids", "1,822,18755", "--max-new-tokens", "6",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prompt_ids"] == [1, 822, 18755] and len(doc["output_ids"]) == 6 and doc["text"] is None
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1,822,18755", "--max-new-tokens",
                 "6"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == Generator.from_dir(model_dir).decode(doc["output_ids"])
