"""Evaluation: mean loss, perplexity and bits per byte of a model on text files.

Long texts are scored with the sliding window of the Hugging Face perplexity guide
(https://huggingface.co/docs/transformers/perplexity): windows of `context_length` tokens
start every `stride` tokens, and each window scores only the tokens that the previous
window did not, so every token is scored exactly once, each seeing at least
`context_length - stride` tokens of context (except near the start). A small stride is
closer to the model's loss with full context and costs about context_length / stride
times the forward passes of a large one. The stride is at most `context_length - 1`: the
guide's stride == context_length (disjoint chunks) would leave each chunk's first token
unpredicted and unscored, and bits per byte would then leave out some of the text.

Each file is one document and is preceded by `<|endoftext|>`, so its first token is
predicted too (from the document boundary, as GPT-2 saw documents in training). Then

    loss          = total nats / scored tokens
    perplexity    = exp(loss)
    bits per byte = total nats / ln 2 / UTF-8 bytes of the text

Bits per byte does not depend on the tokenizer, so models with different vocabularies can
be compared by it.

    >>> model, tokenizer = gptkit.hf.load("runs/demo")
    >>> result = evaluate_texts(model, tokenizer, [text], stride=512)
    >>> result.loss, result.perplexity, result.bits_per_byte
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptkit.errors import GptkitError
from gptkit.train import token_losses

if TYPE_CHECKING:
    from gptkit.model import GPT
    from gptkit.tokenizer import Tokenizer


@dataclass(frozen=True)
class EvalResult:
    """Summed negative log-likelihood over the scored tokens, and what it was measured on."""

    nll: float  # nats, summed
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult(
            self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes
        )


@dataclass(frozen=True)
class Window:
    """Model input ids[begin:end]; targets ids[score_from:end] are scored (score_from > begin)."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows of the HF perplexity guide over a sequence of `n_tokens` ids.

    Window i covers [i * stride, i * stride + context_length) clipped to the sequence and
    scores the targets from the previous window's end on; the first target is ids[1] (ids[0]
    has nothing to be predicted from). Since stride < context_length, each window starts
    before the previous one ends, and the scored ranges tile [1, n_tokens) exactly.
    """
    if not 1 <= stride < context_length:
        raise GptkitError(f"stride must be in [1, {context_length - 1}], got {stride}")
    windows, prev_end = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context_length, n_tokens)
        windows.append(Window(begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def sequence_nll(
    model: GPT, ids: Sequence[int], context_length: int, stride: int, batch_size: int = 8
) -> tuple[float, int]:
    """(summed nats, tokens scored) of the id sequence under `model`, by sliding window.

    Windows of equal length go through the model `batch_size` at a time; only the scored
    positions are unembedded (the (B, T, V) logits of a full window are mostly not needed).
    """
    if batch_size < 1:
        raise GptkitError(f"batch size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()  # dropout would make the figure random (and wrong)
    try:
        return _sequence_nll(model, ids, context_length, stride, batch_size)
    finally:
        model.train(was_training)


def _sequence_nll(
    model: GPT, ids: Sequence[int], context_length: int, stride: int, batch_size: int
) -> tuple[float, int]:
    device = next(model.parameters()).device
    seq = torch.tensor(list(ids), dtype=torch.long, device=device)  # (N,)
    nll, scored = 0.0, 0
    for group in _batches(sliding_windows(len(seq), context_length, stride), batch_size):
        L, first = group[0].end - group[0].begin, group[0].score_from - group[0].begin
        x = torch.stack([seq[w.begin : w.end] for w in group])  # (B, L)
        h = model.hidden_states(x)  # (B, L, C)
        # Position t predicts token t + 1; a window scores targets [first, L) of its own.
        # Every window but the first and the last scores the same count, so a group shares it.
        logits = model.lm_head(h[:, first - 1 : L - 1])  # (B, L - first, V)
        targets = x[:, first:]  # (B, L - first)
        nll += token_losses(logits.flatten(0, 1), targets.flatten()).double().sum().item()
        scored += targets.numel()
    return nll, scored


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows with the same length and the same scored offset, up to batch_size."""
    group: list[Window] = []
    for w in windows:
        if group and (
            len(group) == batch_size
            or w.end - w.begin != group[0].end - group[0].begin
            or w.score_from - w.begin != group[0].score_from - group[0].begin
        ):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def evaluate_texts(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` over `texts` (each one document).

    `context_length` defaults to the model's, `stride` to half of it (the HF guide's
    512 of 1024).
    """
    context_length, stride = _window_sizes(model, context_length, stride)
    total = EvalResult(0.0, 0, 0)
    for text in texts:
        ids = _document_ids(tokenizer, text)
        total = total + _evaluate_ids(model, ids, text, context_length, stride, batch_size)
    if total.tokens == 0:  # its loss would divide by zero
        raise GptkitError("nothing to evaluate: the texts hold no tokens to score")
    return total


def _window_sizes(model: GPT, context_length: int | None, stride: int | None) -> tuple[int, int]:
    """(context length, stride) with their defaults filled in; GptkitError when out of range."""
    n_ctx = model.config.context_length
    context_length = n_ctx if context_length is None else context_length
    if not 2 <= context_length <= n_ctx:
        raise GptkitError(f"context length must be in [2, {n_ctx}], got {context_length}")
    stride = max(1, context_length // 2) if stride is None else stride
    if not 1 <= stride < context_length:
        raise GptkitError(
            f"stride must be in [1, {context_length - 1}] (below the context length "
            f"{context_length}), got {stride}"
        )
    return context_length, stride


def _document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A document's ids, after the end-of-text that marks where it begins."""
    return [tokenizer.eot_id, *tokenizer.encode(text)]


def _evaluate_ids(
    model: GPT, ids: list[int], text: str, context_length: int, stride: int, batch_size: int
) -> EvalResult:
    nll, n = sequence_nll(model, ids, context_length, stride, batch_size)
    return EvalResult(nll, n, len(text.encode("utf-8")))


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; a one-line GptkitError for a missing, binary or empty file."""
    path = Path(path)
    if path.is_dir():
        raise GptkitError(f"{path} is a directory, not a text file; name the files in it")
    if not path.is_file():
        raise GptkitError(f"text file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptkitError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise GptkitError(f"{path} is empty: nothing to evaluate")
    return text


def evaluate_files(
    model: GPT,
    tokenizer: Tokenizer,
    files: Sequence[str | os.PathLike],
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> list[tuple[str, EvalResult]]:
    """[(file, its result)] for each file; every file is read and checked before any is scored."""
    texts = [read_text_file(f) for f in files]
    context_length, stride = _window_sizes(model, context_length, stride)
    results = []
    for f, text in zip(files, texts, strict=True):
        try:
            ids = _document_ids(tokenizer, text)
        except GptkitError as e:  # a char vocabulary meeting a character it lacks: say where
            raise GptkitError(f"{f}: {e}") from None
        result = _evaluate_ids(model, ids, text, context_length, stride, batch_size)
        results.append((str(f), result))
    return results


def format_result(name: str, r: EvalResult) -> str:
    return (
        f"{name}: {r.tokens:,} tokens, {r.bytes:,} bytes, loss {r.loss:.4f}, "
        f"perplexity {r.perplexity:.3f}, bits per byte {r.bits_per_byte:.4f}"
    )
