"""`gptkit eval`: the sliding window, parity with transformers, bits per byte, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import assert_one_line_error, run_cli
from test_convert import _hf_model
from test_hf import SHAPES, save_hf, unit_scale

from gptkit.checkpoint import save_model
from gptkit.errors import GptkitError
from gptkit.evaluate import evaluate_files, evaluate_texts, sequence_nll, sliding_windows
from gptkit.hf import convert_dir, load
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

transformers = pytest.importorskip("transformers")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak. Ça coûte 3 € — 東京 🙂\n\n"
    "def f(x):\n    return x * 2  # <|endoftext|> is text here\n"
) * 4


def hf_sliding_nll(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, on transformers' own loss.

    One correction: the guide counts `valid labels - batch_size` tokens per window, but
    when the first label of a window is already -100 (every window after the first), HF's
    internal shift drops a masked label, not a scored one. Count the shifted labels instead.
    """
    seq = torch.tensor([ids])  # (1, N)
    seq_len = seq.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # may be shorter than stride in the last window
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random 50,257-token GPT-2 saved by transformers, its directory, and a text file."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    # Unit-scale matrices: a peaked model whose predictions depend on their context, so
    # that a window one token short moves the figure far past the tolerance (with GPT-2's
    # 0.02 init every prediction is near uniform and such a bug moved it by 5e-7).
    hf = unit_scale(_hf_model(SHAPES[3]))  # context 32
    save_hf(hf, root / "hf")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return hf, root


@pytest.mark.parametrize("context_length, stride", [(32, 16), (32, 5), (20, 19), (32, 1)])
def test_loss_matches_transformers(
    hf_gpt2, tmp_path: Path, context_length: int, stride: int
) -> None:
    """Guards an off-by-one in the windows (a token scored twice, skipped, or given the
    wrong context): the figure must equal the one computed with transformers directly."""
    hf, root = hf_gpt2
    text = TEXT if stride > 1 else TEXT[:300]  # stride 1: one forward pass per token
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    model, tok = load(root / "hf")
    [(_, result)] = evaluate_files(model, tok, [tmp_path / "text.txt"], context_length, stride, 3)
    ids = [tok.eot_id, *tok.encode(text)]
    assert len(ids) > 2 * context_length  # several windows, a short last one
    nll, n = hf_sliding_nll(hf, ids, context_length, stride)
    assert result.tokens == n == len(ids) - 1  # every token of the text scored once
    assert result.loss == pytest.approx(nll / n, rel=1e-4)
    assert result.bits_per_byte == pytest.approx(
        result.nll / math.log(2) / len(text.encode()), rel=1e-12
    )


def test_batch_size_and_source_do_not_change_the_figure(hf_gpt2, tmp_path: Path) -> None:
    """Guards batching mixing windows up, and the imported copy scoring unlike the HF dir."""
    _, root = hf_gpt2
    convert_dir(root / "hf", tmp_path / "ours", "gptkit")
    results = []
    for source, batch_size in [(root / "hf", 1), (root / "hf", 7), (tmp_path / "ours", 64)]:
        model, tok = load(source)
        [(_, r)] = evaluate_files(model, tok, [root / "text.txt"], None, 10, batch_size)
        results.append(r)
    assert results[0].tokens == results[1].tokens == results[2].tokens
    for r in results[1:]:
        assert r.nll == pytest.approx(results[0].nll, rel=1e-5)


@settings(deadline=None)
@given(st.integers(2, 300), st.integers(2, 64), st.data())
def test_windows_tile_the_sequence(n: int, context_length: int, data) -> None:
    """Guards windows that overlap in what they score, leave gaps, or exceed the context."""
    stride = data.draw(st.integers(1, context_length - 1))
    windows = sliding_windows(n, context_length, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for i, w in enumerate(windows):
        assert w.begin == i * stride and w.end - w.begin <= context_length
        assert w.begin < w.score_from <= w.end


def test_one_window_equals_plain_cross_entropy(hf_gpt2) -> None:
    """Guards the unembedding of only the scored positions picking the wrong positions."""
    _, root = hf_gpt2
    model, tok = load(root / "hf")
    ids = [tok.eot_id, *tok.encode("Hello there, general Kenobi.")]
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x)[0, :-1], x[0, 1:], reduction="sum")
    nll, n = sequence_nll(model, ids, 32, 16)
    assert n == len(ids) - 1 and nll == pytest.approx(expected.item(), rel=1e-6)


def test_cli_prints_each_file_and_the_total(capsys, hf_gpt2, tmp_path: Path) -> None:
    """Guards the CLI printing figures other than the module's, or a wrong total."""
    _, root = hf_gpt2
    other = tmp_path / "other.txt"
    other.write_text("short text, 東京.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", root / "hf", root / "text.txt", other, "--stride", "8")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("total (2 files)")
    model, tok = load(root / "hf")
    results = evaluate_files(model, tok, [root / "text.txt", other], None, 8)
    nll = sum(r.nll for _, r in results)
    tokens = sum(r.tokens for _, r in results)
    n_bytes = sum(r.bytes for _, r in results)
    assert f"loss {nll / tokens:.4f}" in lines[2]
    assert f"perplexity {math.exp(nll / tokens):.3f}" in lines[2]
    assert f"bits per byte {nll / math.log(2) / n_bytes:.4f}" in lines[2]
    assert f"{tokens:,} tokens" in lines[2]


def test_eval_errors_are_one_line(capsys, hf_gpt2, tmp_path: Path) -> None:
    """Guards tracebacks for missing, binary or empty files and impossible window settings."""
    _, root = hf_gpt2
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    text = root / "text.txt"
    for args, needle in [
        ([tmp_path / "nope.txt"], "not found"),
        ([text, tmp_path / "latin1.txt"], "not UTF-8"),
        ([tmp_path / "empty.txt"], "empty"),
        ([text, "--stride", "0"], "stride"),
        ([text, "--stride", "32"], "stride must be in [1, 31]"),
        ([text, "--context-length", "33"], "context length"),
        ([text, "--context-length", "1"], "context length"),
        ([text, "--batch-size", "0"], "batch size"),
    ]:
        code, _, err = run_cli(capsys, "eval", root / "hf", *args)
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli(capsys, "eval", tmp_path / "no_model", text)
    assert_one_line_error(code, err, "not found")


def test_eval_errors_name_the_file(capsys, tmp_path: Path) -> None:
    """Guards "text file not found: DIR" for an existing directory, and a character a char
    vocabulary lacks being reported without the file it is in."""
    tok = CharTokenizer.from_texts(["hello world\n"])
    save_model(tmp_path / "run", GPT(tiny_config(vocab_size=tok.vocab_size)))
    tok.save(tmp_path / "run")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "ok.txt").write_text("hello\n")
    (tmp_path / "uni.txt").write_text("héllo\n")
    code, _, err = run_cli(capsys, "eval", tmp_path / "run", tmp_path / "emptydir")
    assert_one_line_error(code, err, "emptydir is a directory, not a text file")
    code, out, err = run_cli(
        capsys, "eval", tmp_path / "run", tmp_path / "ok.txt", tmp_path / "uni.txt"
    )
    assert_one_line_error(code, err, "uni.txt: character 'é'")


def test_a_model_in_train_mode_is_scored_without_dropout(tmp_path: Path) -> None:
    """Guards evaluate_texts right after training (the model in train mode, dropout on): the
    figure is the eval-mode one, every time, and the model goes back to train mode."""
    from gptkit.tokenizer import build_tokenizer

    tok = build_tokenizer("char", [TEXT])
    model = GPT(tiny_config("gpt2", vocab_size=tok.vocab_size, dropout=0.3))
    expected = evaluate_texts(model.eval(), tok, [TEXT[:200]], stride=8).loss
    model.train()
    assert evaluate_texts(model, tok, [TEXT[:200]], stride=8).loss == expected
    assert model.training
    with pytest.raises(GptkitError, match="nothing to evaluate"):
        evaluate_texts(model, tok, [""])
