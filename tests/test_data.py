"""Data preparation (files -> token files) and batch sampling, on small in-test corpora."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptkit import data
from gptkit.data import (
    eval_batches,
    find_sources,
    load_meta,
    open_split,
    prepare,
    sample_batch,
    split_sizes,
    stdlib_sources,
    token_dtype,
)
from gptkit.errors import GptkitError
from gptkit.tokenizer import load_tokenizer

DOC_A = "First line of A.\n\n  indented   spaces \t\nnaïve café 東京 🙂\n"
DOC_B = "def f(x):\n    return x  # B\n\n\n<|endoftext|> stays text\n"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def stream(out: Path) -> np.ndarray:
    """train + val of a prepared directory: the whole token stream."""
    return np.concatenate([open_split(out, "train"), open_split(out, "val")])


@pytest.fixture
def small_chunks(monkeypatch):
    """Read files 5 bytes at a time: chunk boundaries fall inside lines and characters."""
    monkeypatch.setattr(data, "CHUNK_BYTES", 5)


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_prepare_joins_documents_with_eot(tmp_path, small_chunks, kind):
    """Guards lost or doubled separators, a trailing eot, and chunking that changes ids."""
    a, b = write(tmp_path / "a.txt", DOC_A), write(tmp_path / "b.txt", DOC_B)
    out = tmp_path / "out"
    vocab_size = 300 if kind == "bpe" else None
    meta = prepare([str(a), str(b)], str(out), kind, vocab_size, val_fraction=0.2, progress=False)
    tok = load_tokenizer(out)
    expected = [*tok.encode(DOC_A), tok.eot_id, *tok.encode(DOC_B)]
    assert stream(out).tolist() == expected
    assert meta == load_meta(out)
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert meta["val_tokens"] == len(expected) - math.floor(len(expected) * 0.8)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == (
        kind,
        tok.vocab_size,
        tok.eot_id,
    )
    assert (meta["documents"], meta["sources"], meta["dtype"]) == (2, [str(a), str(b)], "uint16")
    assert meta["bytes"] == len(DOC_A.encode()) + len(DOC_B.encode())
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]


def test_giant_line_is_cut_but_lossless(tmp_path, small_chunks, monkeypatch):
    """Guards unbounded memory on a file that is one huge line (nowhere safe to cut)."""
    monkeypatch.setattr(data, "MAX_CARRY_CHARS", 16)
    text = "word " * 40 + "東京 " * 10
    path = write(tmp_path / "a.txt", text)
    pieces = list(data._read_text(path, "strict", SimpleNamespace(update=lambda n: None)))
    assert max(map(len, pieces)) <= 16 + 5 and "".join(pieces) == text
    out = tmp_path / "out"
    prepare([str(path)], str(out), "gpt2", progress=False)
    assert load_tokenizer(out).decode(stream(out).tolist()) == text


def test_meta_json_has_exactly_the_documented_keys(tmp_path):
    """Guards renamed or missing meta.json keys that train/generate rely on."""
    out = tmp_path / "out"
    prepare([str(write(tmp_path / "a.txt", DOC_A))], str(out), "char", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert list(meta) == list(data.META_KEYS)
    assert meta["version"] == 1


def test_prepared_files_get_the_users_permissions(tmp_path):
    """Guards train.bin, which starts as the token stream's temporary file: mkstemp makes
    it 0600, so another user (or a container) could not read prepared data that the
    umask would have let them, unlike val.bin and meta.json beside it."""
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        prepare([str(write(tmp_path / "a.txt", DOC_A))], str(out), "char", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "train.bin" in modes


def test_prepare_with_an_existing_tokenizer(tmp_path):
    """Guards new data being encoded with a different vocabulary than an earlier run's."""
    first, second = tmp_path / "first", tmp_path / "second"
    prepare([str(write(tmp_path / "a.txt", DOC_A + DOC_B))], str(first), "char", progress=False)
    prepare([str(write(tmp_path / "b.txt", DOC_B))], str(second), str(first), progress=False)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    assert stream(second).tolist() == load_tokenizer(first).encode(DOC_B)


def test_rerun_replaces_outputs_and_leaves_no_temp_files(tmp_path):
    """Guards stale splits from a previous run and leaked .tmp files in the output."""
    out = tmp_path / "out"
    prepare([str(write(tmp_path / "a.txt", DOC_A))], str(out), "char", progress=False)
    meta = prepare([str(write(tmp_path / "b.txt", "xy"))], str(out), "char", progress=False)
    assert meta["train_tokens"] + meta["val_tokens"] == 2
    assert stream(out).tolist() == [0, 1]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_output_inside_input_directory_is_not_read(tmp_path):
    """Guards a rerun ingesting its own meta.json and tokenizer.json as documents."""
    corpus = tmp_path / "corpus"
    a = write(corpus / "a.txt", DOC_A)
    for _ in range(2):
        meta = prepare([str(corpus)], str(corpus / "prepared"), "char", progress=False)
    assert meta["sources"] == [str(a)]


def test_unknown_tokenizer_fails_before_reading_inputs(tmp_path):
    """Guards a typo in the tokenizer name surfacing only after a long scan (or not at all)."""
    with pytest.raises(GptkitError, match="gpt2, char, bpe"):
        prepare([str(tmp_path / "missing.txt")], str(tmp_path / "out"), "gtp2", progress=False)


def test_failed_prepare_keeps_previous_outputs(tmp_path):
    """Guards a failing run (bad input) destroying a good prepared directory."""
    out = tmp_path / "out"
    prepare([str(write(tmp_path / "a.txt", DOC_A))], str(out), "char", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(GptkitError):
        prepare([str(write(tmp_path / "bad.txt", b"ok\xffno"))], str(out), "char", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("held", ["config.json", "model.safetensors", "train_state.pt"])
def test_prepare_refuses_a_model_or_run_directory(tmp_path, held):
    """Guards `prepare --out RUN` replacing a trained model's tokenizer.json: the run's
    vocabulary would be lost and its weights no longer decode."""
    run = tmp_path / "run"
    write(run / held, "{}")
    write(run / "tokenizer.json", "the model's own")
    with pytest.raises(GptkitError, match=f"holds a model or run \\({held}\\)"):
        prepare([str(write(tmp_path / "a.txt", DOC_A))], str(run), "char", progress=False)
    assert (run / "tokenizer.json").read_text() == "the model's own"


def test_empty_paths_are_not_the_current_directory(tmp_path, monkeypatch):
    """Guards '' meaning '.': `prepare ''` walked the whole working directory and
    `--out ''` wrote train.bin and friends into it."""
    monkeypatch.chdir(tmp_path)
    src = str(write(tmp_path / "a.txt", DOC_A))
    with pytest.raises(GptkitError, match="input path is empty"):
        prepare([""], str(tmp_path / "out"), "char", progress=False)
    with pytest.raises(GptkitError, match="output directory is empty"):
        prepare([src], "", "char", progress=False)
    with pytest.raises(GptkitError, match="unknown tokenizer ''"):
        prepare([src], str(tmp_path / "out"), "", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_unwritable_output_is_one_error(tmp_path):
    """Guards NotADirectoryError tracebacks for an --out below a regular file (any OS
    refusal: read-only file system, permissions, a full disk)."""
    blocker = write(tmp_path / "afile", "not a directory")
    src = str(write(tmp_path / "a.txt", DOC_A))
    with pytest.raises(GptkitError, match="cannot write .*afile/sub: Not a directory"):
        prepare([src], str(blocker / "sub"), "char", progress=False)


def test_disk_full_while_encoding_is_one_error(tmp_path, monkeypatch):
    """Guards an OSError traceback when the token stream cannot be written (ENOSPC), and
    the stream's temporary file being left behind."""
    out = tmp_path / "out"
    src = str(write(tmp_path / "a.txt", DOC_A))

    def full(tok, sources, errors, f, dtype, bar):
        f.write(b"\0" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data, "_encode_corpus", full)
    with pytest.raises(GptkitError, match="cannot write .*out: No space left on device"):
        prepare([src], str(out), "char", progress=False)
    assert os.listdir(out) == []


def test_progress_goes_to_stderr_and_can_be_disabled(tmp_path, capfd):
    """Guards a progress bar on stdout (breaks pipes) or one that ignores progress=False."""
    src = str(write(tmp_path / "a.txt", DOC_A))
    prepare([src], str(tmp_path / "quiet"), "char", progress=False)
    assert capfd.readouterr() == ("", "")
    prepare([src], str(tmp_path / "loud"), "char", progress=True)
    captured = capfd.readouterr()
    assert captured.out == "" and "encoding" in captured.err


def test_shakespeare_char_counts(shakespeare, tmp_path):
    """Guards the split rounding: nanoGPT's shakespeare_char split (1,003,854 / 111,540)."""
    meta = prepare([str(shakespeare)], str(tmp_path), "char", val_fraction=0.1, progress=False)
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert (meta["vocab_size"], meta["eot_id"]) == (66, 65)
    text = shakespeare.read_text()
    assert len(set(text)) == 65
    val = open_split(tmp_path, "val")
    assert load_tokenizer(tmp_path).decode(val[:100].tolist()) == text[1_003_854:1_003_954]


# --------------------------------------------------------------------------- splits, dtypes


def test_split_sizes():
    """Guards float noise moving a token (10 * 0.3 = 3.0000000000000004) and val_fraction 0."""
    assert split_sizes(1_115_394, 0.1) == (1_003_854, 111_540)
    assert split_sizes(10, 0.3) == (7, 3)
    assert split_sizes(10, 0.0) == (10, 0)
    assert split_sizes(0, 0.5) == (0, 0)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_val_fraction_out_of_range(tmp_path, fraction):
    """Guards an empty train split or a nonsensical fraction being accepted."""
    src = str(write(tmp_path / "a.txt", DOC_A))
    with pytest.raises(GptkitError, match="val_fraction"):
        prepare([src], str(tmp_path / "out"), "char", val_fraction=fraction, progress=False)


def test_dtype_choice():
    """Guards ids >= 65536 being truncated into uint16."""
    assert token_dtype(66) == "uint16"
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"


def fake_prepared(tmp_path: Path, dtype: str, train: list[int], val: list[int]) -> Path:
    np.array(train, data.DTYPES[dtype]).tofile(tmp_path / "train.bin")
    np.array(val, data.DTYPES[dtype]).tofile(tmp_path / "val.bin")
    meta = dict(
        version=1, tokenizer="bpe", vocab_size=70_000, eot_id=0, dtype=dtype,
        train_tokens=len(train), val_tokens=len(val), documents=1, sources=[], bytes=0,
    )  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_open_split_uint32_and_read_only(tmp_path):
    """Guards reading uint32 files as uint16, and training code scribbling on the data."""
    d = fake_prepared(tmp_path, "uint32", [69_999, 65_536, 1], [])
    train = open_split(d, "train")
    assert train.dtype == np.uint32 and train.tolist() == [69_999, 65_536, 1]
    with pytest.raises(ValueError):
        train[0] = 5
    assert open_split(d, "val").shape == (0,)


def test_open_split_size_mismatch(tmp_path):
    """Guards silently training on a truncated or foreign token file."""
    d = fake_prepared(tmp_path, "uint16", [1, 2, 3], [4])
    (d / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(GptkitError, match="train.bin.*prepare"):
        open_split(d, "train")
    (d / "val.bin").unlink()
    with pytest.raises(GptkitError, match="val.bin is missing"):
        open_split(d, "val")


def test_empty_train_split_is_refused_and_keeps_previous_outputs(tmp_path):
    """Guards --val-fraction 0.9999999 reporting '0 train + N val tokens' with status 0
    (and replacing a good prepared directory with one that cannot train)."""
    src, out = str(write(tmp_path / "a.txt", DOC_A)), tmp_path / "out"
    prepare([src], str(out), "char", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(GptkitError, match="leaves none of the .* tokens.*smaller val_fraction"):
        prepare([src], str(out), "char", val_fraction=0.9999999, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_load_meta_errors(tmp_path):
    """Guards tracebacks instead of 'run gptkit prepare' for missing or damaged data."""
    text = write(tmp_path / "small.txt", DOC_A)  # `train --data small.txt`: not "missing"
    with pytest.raises(GptkitError, match="small.txt is a file, not a directory.*prepare"):
        load_meta(text)
    text.unlink()
    with pytest.raises(GptkitError, match="does not exist.*gptkit prepare"):
        load_meta(tmp_path / "nowhere")
    with pytest.raises(GptkitError, match="missing.*gptkit prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(GptkitError, match="gptkit prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"version": 1}')
    with pytest.raises(GptkitError, match="lacks required keys"):
        load_meta(tmp_path)


# --------------------------------------------------------------------------- inputs


def test_directory_walk_skips_binary_empty_and_hidden(tmp_path):
    """Guards a directory walk feeding binaries, empty files or .git into the corpus."""
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "a" / "z.py", "zed")
    write(root / "image.png", b"\x89PNG\0\0binary")
    write(root / "empty.txt", "")
    write(root / ".hidden.txt", "secret")
    write(root / ".git" / "config", "[core]")
    assert find_sources([root]) == [root / "a" / "z.py", root / "b.txt"]


def test_glob_inputs_and_duplicates(tmp_path):
    """Guards globs being taken literally, and a file named twice becoming two documents."""
    a, b = write(tmp_path / "a.txt", "aa"), write(tmp_path / "b.txt", "bb")
    write(tmp_path / "c.md", "cc")
    assert find_sources([str(tmp_path / "*.txt"), str(a)]) == [a, b]
    with pytest.raises(GptkitError, match="no files match"):
        find_sources([str(tmp_path / "*.rst")])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", b"", "is empty"),
        ("binary.txt", b"text\0more", "looks binary"),
    ],
)
def test_explicit_input_errors_name_the_file(tmp_path, name, content, message):
    """Guards a missing, empty or binary file the user named being skipped silently."""
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(GptkitError, match=f"{name}.*{message}"):
        prepare([str(path)], str(tmp_path / "out"), progress=False)


def test_no_input_files_at_all(tmp_path):
    """Guards preparing an empty corpus from a directory without text files."""
    write(tmp_path / "corpus" / "only.bin", b"\0\0")
    with pytest.raises(GptkitError, match="no input text files"):
        prepare([str(tmp_path / "corpus")], str(tmp_path / "out"), progress=False)
    with pytest.raises(GptkitError, match="no input text files"):
        prepare([], str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_non_utf8_reports_file_and_byte_offset(tmp_path, small_chunks, kind):
    """Guards a bare UnicodeDecodeError, or a wrong offset when the bad byte is in a later chunk."""
    # 5-byte reads: "ö" (bytes 9-10) straddles two reads, then 0xff is byte 11.
    content = "héllo wxö".encode() + b"\xff tail\n"
    bad = write(tmp_path / "latin.txt", content)
    with pytest.raises(GptkitError, match=r"latin\.txt.*byte offset 11.*--errors replace"):
        prepare([str(bad)], str(tmp_path / "out"), kind, progress=False)


def test_errors_replace_substitutes(tmp_path, small_chunks):
    """Guards errors='replace' still failing, or dropping the undecodable bytes' position."""
    bad = write(tmp_path / "latin.txt", b"caf\xe9 ok\n")
    out = tmp_path / "out"
    prepare([str(bad)], str(out), "char", val_fraction=0.0, errors="replace", progress=False)
    assert load_tokenizer(out).decode(stream(out).tolist()) == "caf\ufffd ok\n"


def test_stdlib_sources():
    """Guards the demo corpus picking up site-packages, empty files or non-Python files."""
    files = stdlib_sources()
    assert len(files) > 100 and files == sorted(files)
    assert all(p.suffix == ".py" and p.stat().st_size > 0 for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert any(p.name == "json" or p.parent.name == "json" for p in files)


# --------------------------------------------------------------------------- batches


def test_sample_batch_shapes_and_shift():
    """Guards off-by-one targets, wrong dtype, or windows running past the split's end."""
    tokens = np.arange(50, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = sample_batch(tokens, 8, 10, g)
        assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # consecutive ids: each target is the next token
        assert int(y.max()) <= 49
        assert y.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_batches_reach_cuda_unchanged():
    """Guards the asynchronous copies to the card: every batch, used at once by the next
    kernels, holds the windows the same generator state gives on the CPU."""
    tokens = np.random.default_rng(0).integers(0, 50257, 100_000).astype(np.uint32)
    on_cpu, on_cuda = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):
        want = sample_batch(tokens, 16, 256, on_cpu)
        got = sample_batch(tokens, 16, 256, on_cuda, "cuda")
        assert all(t.device.type == "cuda" and t.is_contiguous() for t in got)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))


def test_sample_batch_reaches_both_ends():
    """Guards an offset range that never samples the first or the last window."""
    tokens = np.arange(12, dtype=np.uint16)
    x, y = sample_batch(tokens, 500, 10, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1}
    assert int(y.max()) == 11


def test_sample_batch_is_determined_by_the_generator():
    """Guards inexact resume: restoring the generator state must replay the same batches."""
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(1337)
    sample_batch(tokens, 4, 16, g)
    state = g.get_state()
    first = sample_batch(tokens, 4, 16, g)
    g.set_state(state)
    again = sample_batch(tokens, 4, 16, g)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_sample_batch_from_memmap(tmp_path):
    """Guards sampling that fails on (or copies all of) a read-only memmapped split."""
    d = fake_prepared(tmp_path, "uint16", list(range(100)), [1, 2])
    x, y = sample_batch(open_split(d, "train"), 3, 7, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1)


def test_sample_batch_split_too_short():
    """Guards an obscure numpy error when the split is shorter than one window."""
    with pytest.raises(GptkitError, match="fewer than context_length"):
        sample_batch(np.arange(10, dtype=np.uint16), 2, 10, torch.Generator())


@pytest.mark.parametrize(("n", "batch_size", "T"), [(2, 1, 1), (21, 3, 5), (23, 2, 5), (7, 4, 10)])
def test_eval_batches_cover_every_target_once(n, batch_size, T):
    """Guards a validation loss that skips the tail, repeats windows, or misaligns targets."""
    tokens = np.arange(n, dtype=np.uint16)
    targets = []
    for x, y in eval_batches(tokens, batch_size, T):
        assert x.shape == y.shape and x.shape[0] <= batch_size and x.shape[1] <= T
        assert torch.equal(y, x + 1)
        targets += y.flatten().tolist()
    assert targets == list(range(1, n))


def test_eval_batches_too_short():
    """Guards an empty (or division-by-zero) validation figure from a tiny split."""
    with pytest.raises(GptkitError, match="at least 2"):
        eval_batches(np.arange(1, dtype=np.uint16), 4, 8)
