"""Prepared data: text corpora become token files, and token files become batches.

`prepare` streams text files through a tokenizer into ``out/``: ``train.bin`` and
``val.bin`` (raw little-endian token ids, uint16 when the vocabulary fits, else uint32),
``tokenizer.json`` and, written last, ``meta.json``. Each file is one document; documents
are joined by the end-of-text token. Memory does not grow with the corpus.

    >>> meta = prepare(["shakespeare.txt"], "data/shakespeare", tokenizer="char")
    >>> train = open_split("data/shakespeare", "train")  # read-only np.memmap
    >>> g = torch.Generator().manual_seed(1337)
    >>> x, y = sample_batch(train, batch_size=12, context_length=64, generator=g)
    >>> x.shape, y.shape  # y is x shifted left by one token
    (torch.Size([12, 64]), torch.Size([12, 64]))
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

from gptkit.errors import GptkitError
from gptkit.fileio import (
    atomic_open,
    atomic_write_json,
    atomic_write_with,
    cannot_write,
    make_dir,
    temp_file,
)
from gptkit.tokenizer import KINDS, SAFE_CUT, Tokenizer, build_tokenizer, load_tokenizer

META_FILE = "meta.json"
META_VERSION = 1
# meta.json's keys, in order; train, generate and the CLI read them.
META_KEYS = ("version", "tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens",
             "val_tokens", "documents", "sources", "bytes")  # fmt: skip
# Little-endian on disk whatever the host, so a prepared directory can be copied anywhere.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
CHUNK_BYTES = 4 << 20  # read size; bounds memory together with MAX_CARRY_CHARS
MAX_CARRY_CHARS = 16 << 20  # text with no safe cut point is cut anyway past this length
SNIFF_BYTES = 8192  # a NUL byte in this prefix marks a file as binary
# Files that make a directory a model or a run (checkpoint.py's names, not imported: data
# needs no model code). prepare's tokenizer.json would replace the model's own there.
MODEL_FILES = ("config.json", "model.safetensors", "train_state.pt")


# --------------------------------------------------------------------------- inputs


def find_sources(
    inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[Path]:
    """The text files named by `inputs` (files, directories, glob patterns), in order, once.

    Files named explicitly must exist and be non-empty text. Files found by walking a
    directory or matching a pattern are skipped when empty, binary, hidden (dot-named) or
    inside `exclude` (prepare's output directory: a rerun must not read its own outputs).
    """
    skip = None if exclude is None else Path(exclude).resolve()
    found: dict[Path, Path] = {}  # resolved -> as found; keeps first-seen order
    for item in inputs:
        for path, explicit in _expand(str(item)):
            if explicit:
                _check_explicit(path)
            elif not _is_nonempty_text(path) or (skip and path.resolve().is_relative_to(skip)):
                continue
            found.setdefault(path.resolve(), path)
    if not found:
        raise GptkitError(
            f"no input text files found in: {', '.join(map(str, inputs)) or '(none)'}"
        )
    return list(found.values())


def _expand(item: str) -> Iterator[tuple[Path, bool]]:
    """(path, named explicitly) pairs for one input argument."""
    if not item:  # Path("") is the current directory: it would be walked silently
        raise GptkitError("an input path is empty; name a text file, directory or pattern")
    path = Path(item)
    if path.is_dir():
        yield from ((p, False) for p in _walk(path))
    elif path.exists() or not any(c in item for c in "*?["):
        yield path, True
    else:
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise GptkitError(f"no files match the pattern {item!r}")
        for m in map(Path, matches):
            yield from ((p, False) for p in (_walk(m) if m.is_dir() else [m]))


def _walk(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .venv, ...
        files += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(files)


def _sniff(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(SNIFF_BYTES)
    except OSError as e:
        raise GptkitError(f"cannot read input file {path}: {e.strerror}") from None


def _is_nonempty_text(path: Path) -> bool:
    return path.is_file() and b"\0" not in (head := _sniff(path)) and len(head) > 0


def _check_explicit(path: Path) -> None:
    if not path.exists():
        raise GptkitError(f"input file {path} does not exist")
    if not path.is_file():
        raise GptkitError(f"input {path} is not a regular file")
    head = _sniff(path)
    if not head:
        raise GptkitError(f"input file {path} is empty")
    if b"\0" in head:
        raise GptkitError(f"input file {path} looks binary (it has a NUL byte); give text files")


def stdlib_sources() -> list[Path]:
    """The Python standard library's own non-empty `.py` files, sorted: the demo corpus.

    A few of them are not UTF-8 (encoding tests): prepare them with ``errors="replace"``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages are not the standard library (and may be huge).
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(p for p in files if _is_nonempty_text(p))


# --------------------------------------------------------------------------- reading text


def _read_text(path: Path, errors: str, bar: Any) -> Iterator[str]:
    """The text of `path` in pieces cut only where tokenisation is unaffected (SAFE_CUT)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    carry, offset = "", 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(CHUNK_BYTES):
                text = carry + _decode(decoder, raw, offset, path)
                offset += len(raw)
                bar.update(len(raw))
                cut = _last_safe_cut(text)
                if cut:
                    yield text[:cut]
                carry = text[cut:]
            carry += _decode(decoder, b"", offset, path, final=True)
    except OSError as e:
        raise GptkitError(f"cannot read input file {path}: {e.strerror}") from None
    if carry:
        yield carry


def _decode(decoder: Any, raw: bytes, offset: int, path: Path, final: bool = False) -> str:
    pending = len(decoder.getstate()[0])  # bytes of a character split across reads
    try:
        return decoder.decode(raw, final=final)
    except UnicodeDecodeError as e:
        raise GptkitError(
            f"input file {path} is not valid UTF-8 at byte offset {offset - pending + e.start}; "
            "use --errors replace to substitute U+FFFD for undecodable bytes"
        ) from None


def _last_safe_cut(text: str) -> int:
    """Index of the last SAFE_CUT in `text`; 0 to keep carrying, unless it grew too long."""
    i = text.rfind("\n")
    while i > 0 and text[i - 1].isspace():
        i = text.rfind("\n", 0, i)
    if i > 0:
        return i
    # A giant line: cutting it may split a pre-token (still lossless); memory stays bounded.
    return len(text) if len(text) > MAX_CARRY_CHARS else 0


def _corpus(sources: Sequence[Path], errors: str, bar: Any) -> Iterator[str]:
    """Every document's text as SAFE_CUT lines, for a vocabulary pass (the trainer's input)."""
    for path in sources:
        for text in _read_text(path, errors, bar):
            yield from SAFE_CUT.split(text)


# --------------------------------------------------------------------------- prepare


def token_dtype(vocab_size: int) -> str:
    """Name of the narrowest unsigned dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def split_sizes(total: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) token counts: train is the first floor(total * (1 - val_fraction)).

    nanoGPT's split (`data[:int(n * 0.9)]`), computed exactly on the decimal the user wrote
    so that float noise (0.3 * 10 = 3.0000000000000004) cannot move a token.
    """
    n_train = math.floor(total * (1 - Fraction(str(float(val_fraction)))))
    return n_train, total - n_train


def prepare(
    inputs: Sequence[str],
    out: str,
    tokenizer: str = "gpt2",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    errors: Literal["strict", "replace"] = "strict",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into `out`/{train.bin, val.bin, tokenizer.json, meta.json}.

    `tokenizer` is a kind (gpt2, char, bpe) or the path of an existing tokenizer.json (or
    its directory), to encode new data exactly as an earlier run did. The validation split
    is the tail of the token stream. Returns the meta.json content.
    """
    if not str(out):  # Path("") is the current directory
        raise GptkitError("the output directory is empty; give --out a directory name")
    out_dir = Path(out)
    _check_args(tokenizer, vocab_size, val_fraction, errors, out_dir)
    sources = find_sources(inputs, exclude=out_dir)
    n_bytes = sum(p.stat().st_size for p in sources)
    tok = _make_tokenizer(tokenizer, vocab_size, sources, errors, n_bytes, progress)
    dtype = token_dtype(tok.vocab_size)
    make_dir(out_dir)
    fd, stream = temp_file(out_dir / "train.bin")  # becomes train.bin: the user's umask
    try:
        with os.fdopen(fd, "wb") as f, _progress(n_bytes, "encoding", progress) as bar:
            total = _encode_corpus(tok, sources, errors, f, DTYPES[dtype], bar)
        n_train, n_val = split_sizes(total, val_fraction)
        _check_train_split(n_train, total, val_fraction)  # before any output is replaced
        meta = {
            "version": META_VERSION,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "documents": len(sources),
            "sources": [str(p) for p in sources],
            "bytes": n_bytes,
        }
        _write_outputs(out_dir, stream, meta, tok)
    except OSError as e:  # writing the token stream (a full disk); reading raises GptkitError
        raise cannot_write(out_dir, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stream)
    return meta


def _check_args(
    tokenizer: str, vocab_size: int | None, val_fraction: float, errors: str, out_dir: Path
) -> None:
    """Fail on bad arguments before reading any input."""
    if tokenizer not in KINDS and (not tokenizer or not Path(tokenizer).exists()):
        raise GptkitError(
            f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(KINDS)}, "
            "or give the path of a tokenizer.json"
        )
    if tokenizer not in KINDS and vocab_size is not None:
        raise GptkitError("vocab_size cannot change an existing tokenizer")
    if not 0 <= val_fraction < 1:
        raise GptkitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if errors not in ("strict", "replace"):
        raise GptkitError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise GptkitError(f"output {out_dir} exists and is not a directory")
    held = [name for name in MODEL_FILES if (out_dir / name).exists()]
    if held:
        raise GptkitError(
            f"output {out_dir} holds a model or run ({held[0]}); its tokenizer.json would be "
            "replaced: prepare the data into another directory"
        )


def _check_train_split(n_train: int, total: int, val_fraction: float) -> None:
    # Known only once the corpus is encoded; an empty train split would "succeed" (status 0)
    # and leave the failure to `gptkit train`.
    if n_train == 0:
        raise GptkitError(
            f"val_fraction {val_fraction} leaves none of the {total:,} tokens for training; "
            "use a smaller val_fraction"
        )


def _make_tokenizer(
    spec: str,
    vocab_size: int | None,
    sources: Sequence[Path],
    errors: str,
    n_bytes: int,
    progress: bool,
) -> Tokenizer:
    if spec not in KINDS:  # a path, checked by _check_args
        return load_tokenizer(spec)
    if spec == "gpt2":
        return build_tokenizer(spec, vocab_size=vocab_size)
    # char and bpe learn their vocabulary in a first pass over the corpus.
    with _progress(n_bytes, f"{spec} vocabulary", progress) as bar:
        return build_tokenizer(spec, _corpus(sources, errors, bar), vocab_size)


def _encode_corpus(
    tok: Tokenizer, sources: Sequence[Path], errors: str, f: IO[bytes], dtype: np.dtype, bar: Any
) -> int:
    """Append every document's ids to `f`, an end-of-text between documents; the count."""
    total = 0
    eot = np.array([tok.eot_id], dtype)
    for k, path in enumerate(sources):
        if k:
            f.write(eot.tobytes())
            total += 1
        for text in _read_text(path, errors, bar):
            try:
                ids = tok.encode(text)
            except GptkitError as e:  # a reused char tokenizer meeting a new character
                raise GptkitError(f"{path}: {e}") from None
            arr = np.array(ids, dtype)
            f.write(arr.tobytes())
            total += len(arr)
    return total


def _write_outputs(out_dir: Path, stream: str, meta: dict[str, Any], tok: Tokenizer) -> None:
    """Move the token stream into train.bin/val.bin, then tokenizer.json, then meta.json.

    meta.json goes first (removed) and last (written): a directory interrupted half-way is
    "not prepared", never a mix of old and new files that looks valid.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / META_FILE)
    train_bytes = meta["train_tokens"] * DTYPES[meta["dtype"]].itemsize
    with open(stream, "rb") as src, atomic_open(out_dir / "val.bin") as dst:
        src.seek(train_bytes)
        shutil.copyfileobj(src, dst)

    def move_head(tmp: str) -> None:
        # The train split is the stream's head: rename and truncate instead of copying.
        os.replace(stream, tmp)
        os.truncate(tmp, train_bytes)

    atomic_write_with(out_dir / "train.bin", move_head)
    tok.save(out_dir)
    atomic_write_json(out_dir / META_FILE, meta)


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    kw = dict(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    with tqdm(total=total, desc=desc, disable=not enabled, **kw) as bar:
        yield bar


# --------------------------------------------------------------------------- reading back


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a prepared directory, checked for the keys other code relies on."""
    path = Path(data_dir) / META_FILE
    if Path(data_dir).is_file():  # text given where its prepared directory belongs
        raise GptkitError(
            f"{data_dir} is a file, not a directory made by `gptkit prepare`; run "
            f"`gptkit prepare {data_dir} --out DIR` and use DIR"
        )
    if not Path(data_dir).is_dir():
        raise GptkitError(f"data directory {data_dir} does not exist; run `gptkit prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptkitError(f"{path} is missing; run `gptkit prepare` first") from None
    except (OSError, ValueError) as e:
        raise GptkitError(f"{path} is unreadable ({e}); run `gptkit prepare` again") from None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise GptkitError(f"{path} lacks required keys; run `gptkit prepare` again")
    if meta["version"] != META_VERSION or meta["dtype"] not in DTYPES:
        raise GptkitError(f"{path} has an unsupported version or dtype; run `gptkit prepare`")
    return meta


def open_split(data_dir: str | os.PathLike, split: Literal["train", "val"]) -> np.ndarray:
    """The token ids of one split as a read-only array (a np.memmap unless it is empty)."""
    if split not in ("train", "val"):
        raise GptkitError(f"split must be 'train' or 'val', got {split!r}")
    meta = load_meta(data_dir)
    dtype, n = DTYPES[meta["dtype"]], meta[f"{split}_tokens"]
    path = Path(data_dir) / f"{split}.bin"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GptkitError(f"{path} is missing; run `gptkit prepare` again") from None
    if size != n * dtype.itemsize:
        raise GptkitError(
            f"{path} has {size} bytes but meta.json says {n} {meta['dtype']} tokens; "
            "run `gptkit prepare` again"
        )
    if n == 0:  # mmap cannot map an empty file
        tokens = np.empty(0, dtype)
        tokens.flags.writeable = False
        return tokens
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


# --------------------------------------------------------------------------- batches


def sample_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `tokens`: x (B, T) and targets y = x shifted by one, both int64.

    Offsets come from `generator` alone, so saving and restoring its state resumes the
    exact batch sequence. With `world_size` > 1, the offsets of a global batch of
    `batch_size * world_size` windows are drawn and rank `rank` keeps rows
    [rank * B, (rank + 1) * B): ranks with equal generators read disjoint rows, together
    exactly the batch of one process with `batch_size * world_size`.
    """
    n, T = len(tokens), context_length
    if batch_size < 1 or T < 1:
        raise GptkitError(f"batch_size and context_length must be >= 1, got {batch_size}, {T}")
    if n < T + 1:
        raise GptkitError(
            f"the split has {n} tokens, fewer than context_length + 1 = {T + 1}; "
            "use a shorter context or more data"
        )
    offsets = torch.randint(n - T, (batch_size * world_size,), generator=generator).numpy()
    offsets = offsets[rank * batch_size : (rank + 1) * batch_size]
    # A strided view of all windows: indexing it copies B contiguous rows (no Python loop).
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)[offsets]  # (B, T+1)
    return _split_xy(windows, device)


def eval_batches(
    tokens: np.ndarray, batch_size: int, context_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (x, y) batches predicting every token of `tokens` but the first, once.

    Non-overlapping windows of `context_length` targets, `batch_size` windows a batch; the
    last partial window comes alone as a (1, r) batch. Weight each batch's mean loss by
    ``y.numel()`` to get the mean over the whole split.
    """
    n, T = len(tokens), context_length
    if batch_size < 1 or T < 1:
        raise GptkitError(f"batch_size and context_length must be >= 1, got {batch_size}, {T}")
    if n < 2:
        raise GptkitError(f"the split has {n} tokens; evaluation needs at least 2")
    return _eval_windows(tokens, batch_size, T)


def _eval_windows(
    tokens: np.ndarray, batch_size: int, T: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n_full = (len(tokens) - 1) // T  # windows with T targets each
    if n_full:
        view = np.lib.stride_tricks.sliding_window_view(tokens[: n_full * T + 1], T + 1)
        windows = view[::T]  # (n_full, T+1), consecutive windows share one boundary token
        for start in range(0, n_full, batch_size):
            yield _split_xy(windows[start : start + batch_size], "cpu")
    rest = len(tokens) - 1 - n_full * T
    if rest:
        yield _split_xy(tokens[None, n_full * T :], "cpu")  # (1, rest + 1)


def _split_xy(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
    # Contiguous, so that callers may .view(-1) the targets for the loss.
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
    kind = torch.device(device).type
    if kind == "cuda":
        # From pinned memory the copies are asynchronous: the host goes on to launch the
        # step instead of first waiting for the card to finish the last one.
        x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    elif kind != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y
