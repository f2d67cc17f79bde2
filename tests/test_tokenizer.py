"""Tokenizers: GPT-2 ids against an independent implementation, round trips, save/load, errors."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit import tokenizer as tk
from gptkit.errors import GptkitError
from gptkit.tokenizer import SAFE_CUT, build_tokenizer, load_tokenizer

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "def add(a, b):\n    return a + b  # the sum\n\n\nclass Point:\n    x: int = 0\n",
    "naïve café, 東京 🙂 — tabs\tand  double  spaces   end \n",
]
# Text a tokenizer meets in the wild: emoji, CJK, combining marks, runs of whitespace.
EXAMPLES = [
    "",
    "Hello world",
    " leading and trailing  ",
    "I'm sure they'll've done it, y'all",
    "\n\n\n  \t \r\n",
    "東京は日本の首都です。",
    "👩‍👩‍👧‍👦 🙂🙃 emoji",
    "e\u0301 combining accent",
    "<|endoftext|> is just text here",
    "x" * 5000 + "\n  \n" * 1000,  # long input: the batched path of the bpe encoder
]
# Any valid Unicode (lone surrogates have no UTF-8 form, so no tokenizer can keep them).
wild_text = st.text(
    st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(" \n\t\r🙂東é'")),
    max_size=200,
)


@functools.cache
def gpt2() -> tk.Tokenizer:
    return build_tokenizer("gpt2")


@functools.cache
def bpe() -> tk.Tokenizer:
    return build_tokenizer("bpe", iter(CORPUS * 3), vocab_size=300)


def make(kind: str) -> tk.Tokenizer:
    return gpt2() if kind == "gpt2" else bpe() if kind == "bpe" else build_tokenizer("char", CORPUS)


@functools.cache
def hf_gpt2_reference():
    """GPT-2 built by Hugging Face tokenizers from the same files: an independent encoder."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    data = tk._gpt2_data_dir()
    return ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))


# --------------------------------------------------------------------------- gpt2


def test_gpt2_known_ids():
    """Guards a wrong vocabulary or byte mapping: GPT-2's published ids for a classic input."""
    tok = gpt2()
    assert tok.kind == "gpt2"
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id, tok.eot_token) == (50257, 50256, "<|endoftext|>")
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_gpt2_literal_endoftext_is_ordinary_text():
    """Guards user text forging a document boundary: the literal string is not id 50256."""
    tok = gpt2()
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("text", EXAMPLES)
def test_gpt2_matches_hf_on_examples(text):
    """Guards a wrong regex, rank table or special-token handling in the tiktoken encoder."""
    assert gpt2().encode(text) == hf_gpt2_reference().encode(text).ids


# Characters assigned in Python's Unicode database: on code points unassigned there, the
# regex engines of tiktoken and HF disagree about \p{L} (different Unicode versions).
assigned_text = st.text(
    st.one_of(st.characters(exclude_categories=("Cs", "Cn")), st.sampled_from(" \n\t🙂東'")),
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(assigned_text)
def test_gpt2_matches_hf_reference(text):
    """Guards divergence from GPT-2's real tokenisation on arbitrary text."""
    assert gpt2().encode(text) == hf_gpt2_reference().encode(text).ids


@settings(max_examples=150, deadline=None)
@given(wild_text)
def test_gpt2_round_trip(text):
    """Guards lossy encoding: every string comes back exactly."""
    assert gpt2().decode(gpt2().encode(text)) == text


def test_gpt2_bad_sha256_is_refused(tmp_path, monkeypatch):
    """Guards silently tokenising with altered GPT-2 files (corrupt or tampered install)."""
    src = tk._gpt2_data_dir()
    shutil.copy(src / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_bytes((src / "vocab.bpe").read_bytes() + b"\n")
    monkeypatch.setattr(tk, "_gpt2_data_dir", lambda: tmp_path)
    with pytest.raises(GptkitError, match=r"vocab\.bpe.*sha256"):
        build_tokenizer("gpt2")


def test_gpt2_saves_a_reference_not_the_vocabulary(tmp_path):
    """Guards copying 1.5 MB of vocabulary into every run directory."""
    gpt2().save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["kind"] == "gpt2" and set(data["sha256"]) == {"encoder.json", "vocab.bpe"}
    assert (tmp_path / "tokenizer.json").stat().st_size < 1000


# --------------------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_chars_then_eot():
    """Guards an unstable id order (set iteration) or the end-of-text id not being last."""
    tok = build_tokenizer("char", ["hello", " world"])
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert (tok.vocab_size, tok.eot_id) == (9, 8)
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 8]) == "he<|endoftext|>"


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from("ab c\n東🙂é\t"), max_size=100))
def test_char_round_trip(text):
    """Guards lossy char encoding of any string over the vocabulary."""
    tok = build_tokenizer("char", ["ab c\n東🙂é\t"])
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_is_named():
    """Guards a bare KeyError (or a silent drop) for a character outside the vocabulary."""
    tok = build_tokenizer("char", ["abc"])
    with pytest.raises(GptkitError, match="'z'"):
        tok.encode("abz")


def test_char_empty_corpus_is_an_error():
    """Guards a zero-character vocabulary that would fail later in the model."""
    with pytest.raises(GptkitError, match="empty"):
        build_tokenizer("char", [])


# --------------------------------------------------------------------------- bpe


def test_bpe_vocabulary_and_eot():
    """Guards a trained BPE that exceeds its vocab_size or lacks the end-of-text token."""
    tok = bpe()
    assert tok.kind == "bpe"
    assert 257 < tok.vocab_size <= 300
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.eot_id not in tok.encode("x <|endoftext|> y")


@settings(max_examples=150, deadline=None)
@given(wild_text)
def test_bpe_round_trip(text):
    """Guards lossy bpe encoding, e.g. of characters never seen in training."""
    assert bpe().decode(bpe().encode(text)) == text


@pytest.mark.parametrize("text", EXAMPLES)
def test_bpe_matches_plain_hf_encode(text):
    """Guards the batched long-text path of the bpe encoder changing the ids."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(bpe().to_json()["hf_tokenizer"]))
    hf.encode_special_tokens = True
    assert bpe().encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_bpe_vocab_size_too_small():
    """Guards a BPE without room for the 256 bytes and <|endoftext|>."""
    with pytest.raises(GptkitError, match="at least 257"):
        build_tokenizer("bpe", ["abc"], vocab_size=256)


# --------------------------------------------------------------------------- all kinds


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from("ab \n\t\r.'東🙂"), max_size=300))
def test_safe_cut_pieces_encode_like_the_whole(text):
    """Guards data.prepare's chunking changing ids: pieces cut at SAFE_CUT encode identically."""
    for tok in (gpt2(), bpe()):
        pieces = SAFE_CUT.split(text)
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_decode_bytes_keeps_partial_characters(kind):
    """Guards a streaming decoder turning half of a multi-byte character into U+FFFD."""
    tok = make(kind)
    ids = tok.encode("🙂")
    assert len(ids) > 1
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "🙂".encode()


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    """Guards a saved tokenizer that encodes differently after loading."""
    tok = make(kind)
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (
            tok.kind,
            tok.vocab_size,
            tok.eot_id,
        )
        for text in CORPUS:
            assert loaded.encode(text) == tok.encode(text)


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_decode_rejects_out_of_range_ids(kind):
    """Guards an IndexError/KeyError (or garbage) when a caller passes a foreign id."""
    tok = make(kind)
    with pytest.raises(GptkitError, match="outside"):
        tok.decode([tok.vocab_size])


def test_unknown_kind_lists_valid_kinds():
    """Guards an unhelpful error for a typo in the tokenizer name."""
    with pytest.raises(GptkitError, match="gpt2, char, bpe"):
        build_tokenizer("gpt3")


def test_vocab_size_only_for_bpe():
    """Guards silently ignoring a vocab_size the user expected to take effect."""
    with pytest.raises(GptkitError, match="only to the bpe"):
        build_tokenizer("char", ["abc"], vocab_size=500)


def test_load_missing_tokenizer_names_the_path(tmp_path):
    """Guards a bare FileNotFoundError when a directory has no tokenizer.json."""
    with pytest.raises(GptkitError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"kind": "wordpiece", "version": 1}', '{"kind": "char", "version": 1}',
     '{"kind": "bpe", "version": 1, "hf_tokenizer": {"model": 3}}', "[]"],
)  # fmt: skip
def test_load_corrupt_tokenizer_names_the_path(tmp_path, content):
    """Guards tracebacks (KeyError, HF's Exception) from a damaged tokenizer.json."""
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(GptkitError, match="tokenizer.json"):
        load_tokenizer(path)


# --------------------------------------------------------------------------- gpt2 vs tiktoken


@functools.cache
def tiktoken_gpt2_reference():
    """tiktoken's own GPT-2 recipe (tiktoken_ext.openai_public.gpt2) on the local files.

    Independent of gptkit's builder: the ranks come from the merges in vocab.bpe (checked by
    tiktoken against encoder.json), the regex is tiktoken's spelling of GPT-2's pattern.
    """
    import os
    from unittest import mock

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = tk._gpt2_data_dir()
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):  # "": no cache written
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=tk.GPT2_SHA256["vocab.bpe"],
            encoder_json_hash=tk.GPT2_SHA256["encoder.json"],
        )
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


PARITY_TEXTS = [
    *EXAMPLES,
    "Ça m'a coûté 3,50 € à Zürich; señor Øyvind naïvely façade-d",
    "中文测试：你好，世界！한국어 텍스트 日本語のテキスト",
    "🤖🚀✨ 🇫🇷🇯🇵 👍🏽 emoji sequences",
    "a    b\t\t\tc\n\n\n\nd \n \n e      \n",
    "def f(x):\n\treturn {'k': [x ** 2 for _ in range(10)]}  # \\u00e9\n",
    "if (a && b || !c) { x->y[0] += 0x1F; } // done\r\n",
    "<|endoftext|>",
    "two<|endoftext|><|endoftext|>in a row, and <|endoftext at the end",
    " <|endoftext|>\n<|endoftext|> spaced",
]


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_gpt2_matches_tiktoken_with_endoftext_disallowed(text):
    """Guards drift from tiktoken's GPT-2 on accents, CJK, emoji, whitespace runs and code,
    and "<|endoftext|>" in user text becoming id 50256 (a forged document boundary)."""
    ids = gpt2().encode(text)
    assert ids == tiktoken_gpt2_reference().encode(text, disallowed_special=())
    assert ids == tiktoken_gpt2_reference().encode_ordinary(text)
    assert 50256 not in ids


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_gpt2_encode_with_eot_matches_tiktoken_allowed_special(text):
    """Guards the explicit special-token path: each literal "<|endoftext|>" -> id 50256."""
    ids = gpt2().encode_with_eot(text)
    assert ids == tiktoken_gpt2_reference().encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == text.count("<|endoftext|>")
    assert gpt2().decode(ids) == text


def test_encode_with_eot_for_every_kind():
    """Guards the end-of-text marker being split into characters by the char and bpe kinds."""
    for kind in ("char", "bpe"):
        tok = make(kind)
        ids = tok.encode_with_eot("ab<|endoftext|>ba")
        assert ids == [*tok.encode("ab"), tok.eot_id, *tok.encode("ba")]


# User text with the marker and its fragments mixed in.
text_with_markers = st.lists(
    st.one_of(wild_text, st.sampled_from(["<|endoftext|>", "<|", "|>", "endoftext", " \n"])),
    max_size=6,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text_with_markers)
def test_gpt2_property_matches_tiktoken_and_round_trips(text):
    """Guards divergence from tiktoken or lossy encoding on arbitrary text, markers included."""
    ref = tiktoken_gpt2_reference()
    ids = gpt2().encode(text)
    assert ids == ref.encode(text, disallowed_special=())
    assert gpt2().decode(ids) == text
    special = gpt2().encode_with_eot(text)
    assert special == ref.encode(text, allowed_special={"<|endoftext|>"})
    assert gpt2().decode(special) == text
