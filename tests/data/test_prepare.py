"""Data preparation: Alpaca conversion, qa templates and masks, WikiText cleaning, packing, held-out
split, multiprocessing, and clear errors that leave no dataset behind."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from cllama.data.corpus import clean_wikitext, qa_tokens, wiki_paragraphs
from cllama.data.mindrecord import read_mindrecord
from cllama.data.prepare import (
    alpaca_to_conversations,
    convert_alpaca,
    prepare_code,
    prepare_qa,
    prepare_wiki,
    stats_path,
    val_path,
)
from cllama.tokenizer import Tokenizer
from tests.conftest import ROOT

ALPACA = Path(str(resources.files("cllama") / "assets" / "code_alpaca_2k.json"))
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# The template texts, typed out here (not imported) so a wrong constant in cllama shows up.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}"
              "\n\n### Response:")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{}\n\n### Response:")


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return Tokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="module")
def alpaca():
    return json.loads(ALPACA.read_text())


def no_dataset_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".mindrecord" in p.name or p.name.endswith(".stats.json")]


# ---- alpaca -> conversation ---------------------------------------------------------------------
def test_every_code_alpaca_example_converts(alpaca, tok):
    conv = alpaca_to_conversations(alpaca)
    assert len(conv) == len(alpaca) == 2017
    for i, (rec, c) in enumerate(zip(alpaca, conv)):
        prompt = (WITH_INPUT.format(rec["instruction"], rec["input"]) if rec["input"]
                  else NO_INPUT.format(rec["instruction"]))
        assert c == {"id": str(i + 1), "conversations": [{"from": "human", "value": prompt},
                                                         {"from": "gpt", "value": rec["output"]}]}
        for template in ("vicuna", "inst"):
            ids, labels = qa_tokens(tok, [(prompt, rec["output"])], template)
            assert len(ids) == len(labels) and labels[0] == -100 and labels[-1] == tok.eos_id


def test_convert_alpaca_file(tmp_path):
    assert convert_alpaca(ALPACA, tmp_path / "conv.json") == 2017
    conv = json.loads((tmp_path / "conv.json").read_text())
    assert conv[0]["conversations"][0]["value"].endswith(
        "### Input:\ndataList = [3, 9, 3, 5, 7, 9, 5]\n\n### Response:")


# ---- qa: ids and label masks token by token -----------------------------------------------------
def test_vicuna_ids_and_labels_by_hand(alpaca, tok):
    sp = tok.sp
    for rec in (alpaca[0], alpaca[3]):  # with and without input
        prompt = (WITH_INPUT.format(rec["instruction"], rec["input"]) if rec["input"]
                  else NO_INPUT.format(rec["instruction"]))
        ids, labels = qa_tokens(tok, [(prompt, rec["output"])], "vicuna")
        head = sp.encode(SYSTEM + " USER: " + prompt + " ASSISTANT:")
        answer = sp.encode(rec["output"])
        assert ids == [1] + head + answer + [2]
        assert labels == [-100] * (1 + len(head)) + answer + [2]
        assert [sp.id_to_piece(i) for i in ids[1:4]] == ["▁A", "▁chat", "▁between"]
        assert [sp.id_to_piece(i) for i in head[-5:]] == ["▁A", "SS", "IST", "ANT", ":"]
        # the whole sequence is the FastChat Vicuna v1.1 prompt string ("</s>" is the eos id)
        assert tok.decode(ids) == f"{SYSTEM} USER: {prompt} ASSISTANT: {rec['output']}"
        # and tokenizing that string in one go gives the same ids
        assert ids == [1] + sp.encode(f"{SYSTEM} USER: {prompt} ASSISTANT: {rec['output']}") + [2]
    first = alpaca[0]
    ids, labels = qa_tokens(tok, [(WITH_INPUT.format(first["instruction"], first["input"]), first["output"])])
    answer = [i for i, label in zip(ids, labels) if label != -100]
    # ▁The ▁distinct ▁values ▁from ▁the ▁given ▁list ▁are
    assert answer[:8] == [450, 8359, 1819, 515, 278, 2183, 1051, 526]


def test_vicuna_two_rounds(tok):
    sp = tok.sp
    ids, labels = qa_tokens(tok, [("Hi?", "Hello."), ("Sort [3, 1].", "[1, 3]")], "vicuna")
    r1, a1 = [1] + sp.encode(SYSTEM + " USER: Hi? ASSISTANT:"), sp.encode("Hello.") + [2]
    r2, a2 = sp.encode("USER: Sort [3, 1]. ASSISTANT:"), sp.encode("[1, 3]") + [2]
    assert ids == r1 + a1 + r2 + a2
    assert labels == [-100] * len(r1) + a1 + [-100] * len(r2) + a2


def test_inst_ids_match_chat_prompt(alpaca, tok):
    rec = alpaca[0]
    prompt = WITH_INPUT.format(rec["instruction"], rec["input"])
    ids, labels = qa_tokens(tok, [(prompt, rec["output"]), ("Thanks!", " Welcome. ")], "inst")
    sp = tok.sp
    q1, a1 = [1] + sp.encode(f"[INST] {prompt} [/INST]"), sp.encode(rec["output"] + " ") + [2]
    q2, a2 = [1] + sp.encode("[INST] Thanks! [/INST]"), sp.encode("Welcome. ") + [2]
    assert ids == q1 + a1 + q2 + a2
    assert labels == [-100] * len(q1) + a1 + [-100] * len(q2) + a2
    assert [sp.id_to_piece(i) for i in q1[1:4]] == ["▁[", "INST", "]"]
    # finished turns exactly as the Instruct chat prompt (tokenizer.py) lays them out
    dialog = [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]},
              {"role": "user", "content": "Thanks!"}]
    assert tok.chat_prompt(dialog) == q1 + a1 + q2


def test_piecewise_equals_whole_string_tokenization(alpaca, tok):
    """Over all of code-alpaca, encoding the template pieces separately gives the ids of the
    complete template string (the answer boundary never merges tokens)."""
    sp = tok.sp
    for rec in alpaca:
        if not rec["output"].strip():
            continue
        q = WITH_INPUT.format(rec["instruction"], rec["input"]) if rec["input"] else NO_INPUT.format(rec["instruction"])
        assert qa_tokens(tok, [(q, rec["output"])], "vicuna")[0] == \
            [1] + sp.encode(f"{SYSTEM} USER: {q} ASSISTANT: {rec['output']}") + [2]
        assert qa_tokens(tok, [(q, rec["output"])], "inst")[0] == \
            [1] + sp.encode(f"[INST] {q.strip()} [/INST] {rec['output'].strip()} ") + [2]


def test_qa_padding_truncation_and_dropping(tmp_path, tok):
    long_q = "word " * 60
    conv = [{"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello there."}]},
            {"id": "b", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "cut"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "Count:"}, {"from": "gpt", "value": "one " * 80}]}]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    p = prepare_qa(tmp_path / "conv.json", tmp_path / "qa.mindrecord", seq_length=63, progress=False)
    rows = read_mindrecord(p.path)
    assert rows["input_ids"].shape == rows["labels"].shape == (2, 64) and rows["input_ids"].dtype == np.int32
    ids, labels = qa_tokens(tok, [("Hi?", "Hello there.")])
    n = len(ids)
    assert rows["input_ids"][0].tolist() == ids + [0] * (64 - n)
    assert rows["labels"][0].tolist() == labels + [-100] * (64 - n)
    ids, labels = qa_tokens(tok, [("Count:", "one " * 80)])
    assert rows["input_ids"][1].tolist() == ids[:64] and rows["labels"][1].tolist() == labels[:64]
    assert p.stats["samples"] == 2 and p.stats["dropped"] == 1 and p.stats["units"] == 3
    assert p.stats["tokens"] == n + 64
    assert p.stats["padding_fraction"] == pytest.approx((64 - n) / 128, abs=1e-6)
    assert json.loads(stats_path(p.path).read_text()) == p.stats


# ---- wiki ---------------------------------------------------------------------------------------
WIKI = (" = Valkyria Chronicles III = \n \n"
        " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the "
        "Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ "
        "playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n \n"
        " = = Gameplay = = \n \n"
        " The game sold 1 @,@ 000 @.@ 5 copies in the player 's \" first \" week . \n \n")
WIKI_CLEAN = ["Senjō no Valkyria 3: Unrecorded Chronicles (Japanese: 戦場のヴァルキュリア3, lit. Valkyria of the "
              "Battlefield 3), commonly referred to as Valkyria Chronicles III outside Japan, is a tactical "
              "role-playing video game developed by Sega and Media.Vision for the PlayStation Portable.",
              "The game sold 1,000.5 copies in the player's \"first\" week."]


def test_wiki_cleaning(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(WIKI, encoding="utf-8")
    assert [clean_wikitext(p).strip() for p in wiki_paragraphs(tmp_path / "wiki.train.tokens")] == WIKI_CLEAN
    assert clean_wikitext("a\n = = = Sub = = = \n") == "a\n=== Sub ===\n"


def test_wiki_chunks_are_the_token_stream(tmp_path, tok):
    (tmp_path / "wiki.train.tokens").write_text(WIKI * 3, encoding="utf-8")
    p = prepare_wiki(tmp_path / "wiki.train.tokens", tmp_path / "wiki.mindrecord", seq_length=15, progress=False)
    stream = [i for _ in range(3) for text in WIKI_CLEAN for i in tok.encode(text, bos=True, eos=True)]
    chunks = read_mindrecord(p.path)["input_ids"]
    assert chunks.shape == (len(stream) // 16, 16)
    assert chunks.reshape(-1).tolist() == stream[:chunks.size]
    assert p.stats["dropped_tokens"] == len(stream) % 16 and p.stats["units"] == 6


def test_wiki_held_out_paragraphs(tmp_path, tok):
    (tmp_path / "wiki.train.tokens").write_text(WIKI * 10, encoding="utf-8")
    runs = [prepare_wiki(tmp_path / "wiki.train.tokens", tmp_path / f"{i}.mindrecord", seq_length=15, val_fraction=0.3,
                         seed=4, progress=False) for i in range(2)]
    assert runs[0].stats["units"] + runs[0].stats["val"]["units"] == 20 and runs[0].stats["val"]["samples"] > 0
    for name in ("path", "val_path"):
        a, b = (read_mindrecord(getattr(r, name))["input_ids"] for r in runs)
        assert np.array_equal(a, b)


# ---- code ---------------------------------------------------------------------------------------
def test_code_chunks_are_the_token_stream(tmp_path, tok):
    files = sorted((p for p in STDLIB.glob("*.py") if p.stat().st_size < 6000), key=str)[:5]
    for i, f in enumerate(files):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}_{f.name}").write_bytes(f.read_bytes())
    (tmp_path / "src" / "9_empty.py").write_text("")
    (tmp_path / "src" / "notes.txt").write_text("not matched")
    p = prepare_code(tmp_path / "src", tmp_path / "code.mindrecord", seq_length=127, glob="*.py", progress=False)
    stream = [i for f in files for i in tok.encode(f.read_text(), bos=True, eos=True)]
    chunks = read_mindrecord(p.path)["input_ids"]
    assert chunks.shape[1] == 128 and chunks.shape[0] == len(stream) // 128
    assert chunks.reshape(-1).tolist() == stream[:chunks.size]
    assert p.stats["files"] == 6 and p.stats["dropped"] == 1 and p.stats["layouts"] == {"plain": 5, "empty": 1}


# ---- held-out split and multiprocessing ---------------------------------------------------------
@pytest.fixture(scope="module")
def small_conv(tmp_path_factory, alpaca):
    path = tmp_path_factory.mktemp("conv") / "conv.json"
    path.write_text(json.dumps(alpaca_to_conversations(alpaca[:600])))
    return path


def test_held_out_split_deterministic_and_disjoint(tmp_path, small_conv):
    full = prepare_qa(small_conv, tmp_path / "all.mindrecord", seq_length=255, progress=False)
    full = read_mindrecord(full.path)["input_ids"]
    runs = [prepare_qa(small_conv, tmp_path / f"{name}.mindrecord", seq_length=255, val_fraction=0.2, seed=seed,
                       progress=False) for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    rows = [(read_mindrecord(r.path)["input_ids"], read_mindrecord(r.val_path)["input_ids"]) for r in runs]
    assert runs[0].val_path == val_path(runs[0].path) == tmp_path / "a.val.mindrecord"
    train, val = rows[0]
    assert np.array_equal(train, rows[1][0]) and np.array_equal(val, rows[1][1])  # same seed
    assert not np.array_equal(val, rows[2][1])  # other seed
    as_set = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert not as_set(train) & as_set(val)
    assert len(train) + len(val) == len(full) and as_set(train) | as_set(val) == as_set(full)
    assert runs[0].stats["val"]["units"] == 120 and runs[0].stats["val"]["samples"] == len(val)
    refused = r"a.mindrecord: the dataset exists \(a.mindrecord, a.mindrecord.db, a.val.mindrecord, .*--overwrite"
    with pytest.raises(FileExistsError, match=refused):  # an existing dataset is refused
        prepare_qa(small_conv, runs[0].path, seq_length=255, progress=False)
    prepare_qa(small_conv, runs[0].path, seq_length=255, progress=False, overwrite=True)  # no held-out set now
    assert not val_path(runs[0].path).exists() and "val" not in json.loads(stats_path(runs[0].path).read_text())


def test_multiprocess_output_equals_single_process(tmp_path, small_conv, codellama_tokenizer_path):
    out = {}
    for workers in (1, 2):
        qa = prepare_qa(small_conv, tmp_path / f"qa{workers}.mindrecord", seq_length=127, val_fraction=0.1,
                        workers=workers, progress=False)
        code = prepare_code(STDLIB, tmp_path / f"code{workers}.mindrecord", seq_length=127, glob="*.py",
                            max_files=24, fim_rate=0.9, tokenizer=codellama_tokenizer_path, workers=workers,
                            progress=False)
        out[workers] = [read_mindrecord(x) for x in (qa.path, qa.val_path, code.path)] + \
            [{k: v for k, v in s.stats.items() if k not in ("seconds", "tokens_per_second")} for s in (qa, code)]
        out[workers][3]["val"].pop("path")
    for a, b in zip(out[1][:3], out[2][:3]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert out[1][3] == out[2][3] and out[1][4] == out[2][4]
    assert out[1][4]["layouts"]["psm"] > 0 and out[1][4]["layouts"]["spm"] > 0


# ---- bad input: one clear error, no dataset under the final name --------------------------------
@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": ', "malformed JSON at line 1"),
    ("", "file is empty"),
    ("[]", "holds no records"),
    ('{"instruction": "a"}', "expected a JSON list"),
    ('[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]', "record 1 has no 'instruction'"),
    ('[{"instruction": "a"}]', "record 0 has no 'output'"),
    ('[{"id": "7", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}]',
     r"record 0 \(id 7\): conversations\[0\].from is 'gpt'"),
])
def test_bad_qa_input(tmp_path, content, message):
    src = tmp_path / "in.json"
    src.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        prepare_qa(src, tmp_path / "out" / "qa.mindrecord", seq_length=64, progress=False)
    assert str(src) in str(err.value)
    assert not (tmp_path / "out").exists() or no_dataset_files(tmp_path / "out")


def test_bad_alpaca_conversion(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "a", "input": 3, "output": "b"}]')
    with pytest.raises(ValueError, match=r"a.json: record 0 field 'input' is a int"):
        convert_alpaca(tmp_path / "a.json", tmp_path / "conv.json")
    assert not (tmp_path / "conv.json").exists()
    with pytest.raises(FileNotFoundError, match="missing.json: missing"):
        convert_alpaca(tmp_path / "missing.json", tmp_path / "conv.json")


def test_bad_options_and_empty_corpora(tmp_path, llama2_tokenizer_path):
    with pytest.raises(ValueError, match="seq_length must be an integer >= 8"):
        prepare_qa(ALPACA, tmp_path / "x.mindrecord", seq_length=7)
    with pytest.raises(ValueError, match=f"{llama2_tokenizer_path}: fim_rate 0.9 needs a tokenizer with infill"):
        prepare_code(STDLIB, tmp_path / "x.mindrecord", seq_length=64, glob="*.py", fim_rate=0.9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no files match --glob"):
        prepare_code(tmp_path / "empty", tmp_path / "x.mindrecord", seq_length=64)
    (tmp_path / "heads.tokens").write_text(" = Title = \n \n = = Section = = \n \n")
    with pytest.raises(ValueError, match="heads.tokens: no samples for x.mindrecord"):
        prepare_wiki(tmp_path / "heads.tokens", tmp_path / "x.mindrecord", seq_length=64, progress=False)
    (tmp_path / "short.tokens").write_text(" Just a few words . \n")
    with pytest.raises(ValueError, match="give more text or lower seq_length"):
        prepare_wiki(tmp_path / "short.tokens", tmp_path / "x.mindrecord", seq_length=64, progress=False)
    (tmp_path / "short.tokens").write_text(" One two three four five six seven eight nine ten . \n")
    with pytest.raises(ValueError, match="1 samples cannot fill 4 shards"):
        prepare_wiki(tmp_path / "short.tokens", tmp_path / "x.mindrecord", seq_length=8, shards=4, progress=False)
    assert no_dataset_files(tmp_path)


def test_failure_mid_write_leaves_nothing(tmp_path, small_conv, monkeypatch):
    """An error after rows reached FileWriter (the 1190th example) discards train and held-out."""
    from cllama.data import corpus

    encode = corpus.QAEncoder.encode
    calls = []

    def failing(self, turns):
        calls.append(1)
        if len(calls) == 1190:
            raise ValueError("boom")
        return encode(self, turns)

    monkeypatch.setattr(corpus.QAEncoder, "encode", failing)
    with pytest.raises(ValueError, match="boom"):
        prepare_qa([small_conv, small_conv], tmp_path / "qa.mindrecord", seq_length=255, val_fraction=0.1,
                   workers=1, progress=False)
    assert len(calls) == 1190 and sorted(os.listdir(tmp_path)) == []


def test_kill_mid_write_leaves_nothing_under_final_name(tmp_path, small_conv):
    """SIGKILL while rows are being written: only a hidden partial folder remains; the next run
    removes it."""
    script = f"""
import os, signal
from cllama.data import corpus
from cllama.data.prepare import prepare_qa
encode, calls = corpus.QAEncoder.encode, []
def dying(self, turns):
    calls.append(1)
    if len(calls) == 1100:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(self, turns)
corpus.QAEncoder.encode = dying
prepare_qa([{str(small_conv)!r}] * 2, {str(tmp_path / 'qa.mindrecord')!r}, seq_length=255, workers=1, progress=False)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".qa.mindrecord.partial-")
    prepare_qa(small_conv, tmp_path / "qa.mindrecord", seq_length=255, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["qa.mindrecord", "qa.mindrecord.db", "qa.stats.json"]


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_alpaca_qa_code(tmp_path, capsys, codellama_tokenizer_path, llama2_tokenizer_path):
    from cllama.cli import main

    assert main(["data", "alpaca", "--src", str(ALPACA), "--dst", str(tmp_path / "conv.json")]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 2017
    assert main(["data", "qa", "--src", str(tmp_path / "conv.json"), "--seq-length", "256", "--template", "inst",
                 "--dst", str(tmp_path / "qa.mindrecord"), "--val-fraction", "0.05", "--shards", "2", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] + out["val"]["samples"] + out["dropped"] + out["val"]["dropped"] == 2017
    assert out["val_dataset"] == str(tmp_path / "qa.val.mindrecord") and out["template"] == "inst"
    assert sorted(p.name for p in tmp_path.iterdir() if "qa" in p.name) == [
        "qa.mindrecord0", "qa.mindrecord0.db", "qa.mindrecord1", "qa.mindrecord1.db", "qa.stats.json",
        "qa.val.mindrecord", "qa.val.mindrecord.db"]
    assert main(["data", "code", "--src", str(STDLIB), "--glob", "*.py", "--max-files", "6", "--fim-rate",
                 "--tokenizer", str(codellama_tokenizer_path), "--seq-length", "64", "--quiet",
                 "--dst", str(tmp_path / "code.mindrecord")]) == 0
    assert json.loads(capsys.readouterr().out)["fim_rate"] == 0.9
    # without --tokenizer, FIM extends the bundled one beside the dataset
    assert main(["data", "code", "--src", str(STDLIB), "--glob", "*.py", "--max-files", "3", "--fim-rate",
                 "--seq-length", "64", "--quiet", "--dst", str(tmp_path / "fim" / "code.mindrecord")]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"]["path"] == str(tmp_path / "fim" / "tokenizer.model")
    assert main(["data", "code", "--src", str(STDLIB), "--glob", "*.py", "--fim-rate", "--seq-length", "64",
                 "--tokenizer", str(llama2_tokenizer_path), "--dst", str(tmp_path / "bad.mindrecord")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cllama data: error:") and "needs a tokenizer with infill pieces" in err
