import re

import pytest

from cllama.tokenizer import Tokenizer, check_tokenizer, extend_tokenizer

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return c\n"
# Pieces, by hand from the Llama 2 vocabulary: "▁def ▁add ( a , ▁b ): \n ▁▁▁▁" for the prefix
# (dummy leading space), "\n ▁▁▁ ▁return ▁c \n" for the suffix (no dummy space).
PREFIX_IDS = [822, 788, 29898, 29874, 29892, 289, 1125, 13, 268]
SUFFIX_IDS = [13, 1678, 736, 274, 13]


@pytest.fixture(scope="module")
def tok(codellama_tokenizer_path):
    return Tokenizer(codellama_tokenizer_path)


def test_extended_tokenizer_has_infill_pieces(tok):
    assert tok.vocab_size == 32016
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (32007, 32008, 32009, 32010)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert len({tok.sp.id_to_piece(i) for i in range(32000, 32016)}) == 16


def test_psm_layout(tok):
    assert tok.encode(PREFIX, bos=False) == PREFIX_IDS
    assert tok.infill_prompt(PREFIX, SUFFIX) == [1, 32007] + PREFIX_IDS + [32008] + SUFFIX_IDS + [32009]


def test_spm_layout(tok):
    ids = tok.infill_prompt(PREFIX, SUFFIX, suffix_first=True)
    assert ids == [1, 32007, 32008] + SUFFIX_IDS + [32009] + PREFIX_IDS


def test_suffix_encoding_has_no_dummy_space(tok):
    def pieces(ids):
        return [tok.sp.id_to_piece(i) for i in ids]

    assert pieces(tok.encode("    return x", bos=False)) == ["▁▁▁▁", "▁return", "▁x"]
    assert pieces(tok.encode_infilling("    return x")) == ["▁▁▁", "▁return", "▁x"]
    assert pieces(tok.encode_infilling("x = 1"))[0] == "x"
    for text in ["    return x", "x = 1", "\tpass", "é\n"]:
        assert "".join(pieces(tok.encode_infilling(text))).replace("▁", " ").replace("<0x0A>", "\n") \
            .replace("<0x09>", "\t") == text


def test_chat_template_system_and_two_turns(tok):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Sort a list.\n"}]
    ids = tok.chat_prompt(dialog)
    first = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST] Hello. ", bos=True, eos=True)
    last = tok.encode("[INST] Sort a list. [/INST]", bos=True)
    assert ids == first + last
    # "[INST] <<SYS>>\n" as Llama 2 chat tokenizes it
    assert ids[:9] == [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13]
    assert ids.count(1) == 2 and ids.count(2) == 1 and ids[-1] != 2


@pytest.mark.parametrize("dialog, message", [
    ([], "empty dialog"),
    ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "system", "content": "s"}], "followed by a user message"),
])
def test_chat_roles_out_of_order(tok, dialog, message):
    with pytest.raises(ValueError, match=message):
        tok.chat_prompt(dialog)


def test_llama2_tokenizer_refuses_infilling(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    assert tok.vocab_size == 32000 and tok.prefix_id is None and not tok.has_infill
    with pytest.raises(ValueError, match="no infilling pieces.*Python and all 34B"):
        tok.infill_prompt("a", "b")


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x\n",
    "\tif x:\n\t\tpass\n",
    "    leading spaces",
    "s = 'héllo wörld ✓ 你好 🙂'\n",
    "  a  b   c\n\n\n",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_extend_refuses_wrong_input(tmp_path, codellama_tokenizer_path):
    with pytest.raises(ValueError, match="has 32016 pieces"):
        extend_tokenizer(codellama_tokenizer_path, tmp_path / "x.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        extend_tokenizer(bad, tmp_path / "y.model")
    assert not (tmp_path / "y.model").exists()


@pytest.mark.parametrize("content", [b"\x00\xff" * 500, b"", b"<unk>\t0\n<s>\t0\n"])
def test_a_file_that_is_not_a_sentencepiece_model_is_a_value_error(tmp_path, content):
    bad = tmp_path / "tok.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="tok.model: not a SentencePiece model"):
        check_tokenizer(bad)
    with pytest.raises(IsADirectoryError, match="is a folder; pass its tokenizer.model"):
        Tokenizer(tmp_path)


def test_extend_refuses_an_existing_destination_unless_overwrite(tmp_path, llama2_tokenizer_path):
    dst = tmp_path / "tokenizer.model"
    dst.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="tokenizer.model: exists"):
        extend_tokenizer(llama2_tokenizer_path, dst)
    assert dst.read_bytes() == b"someone else's"
    extend_tokenizer(llama2_tokenizer_path, dst, overwrite=True)
    assert Tokenizer(dst).vocab_size == 32016
    extend_tokenizer(llama2_tokenizer_path, dst)  # already these bytes: nothing is lost, so no refusal


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
