"""Hugging Face GPT-2 directories: import, export, and loading them like gptkit models.

`convert.py` holds the pure config/state-dict mapping; this module does the files:

    import  HF dir (config.json + model.safetensors | sharded safetensors | pytorch_model.bin)
            -> gptkit model dir (config.json, model.safetensors, tokenizer.json)
    export  gptkit model/run dir -> HF dir that `GPT2LMHeadModel.from_pretrained` loads
            (config.json, model.safetensors, and the tokenizer files HF reads)

A directory is a Hugging Face one when its config.json names a `model_type` (gptkit's
config.json never does). `load(path)` opens either kind, so `sample` and `eval` take both.

Tokenizer on import: a vocabulary of 50,257 is GPT-2's own BPE (checked against the
directory's vocab.json when it has one); otherwise a byte-level BPE `tokenizer.json` with
`<|endoftext|>` is taken over; otherwise the model converts without a tokenizer and the
caller is told why (the weights still load with `checkpoint.load_model`).

    >>> from gptkit.hf import import_hf, export_hf, load
    >>> import_hf("gpt2-hf/", "models/gpt2")       # OpenAI's GPT-2 downloaded by the user
    >>> model, tokenizer = load("gpt2-hf/")        # or use the HF directory directly
    >>> export_hf("runs/mine", "mine-hf/")          # GPT2LMHeadModel.from_pretrained("mine-hf")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptkit.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    load_model,
    read_json,
    save_model,
)
from gptkit.config import GPT2_VOCAB_SIZE, GPTConfig
from gptkit.convert import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from gptkit.data import META_FILE
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_json, atomic_write_with
from gptkit.model import GPT

if TYPE_CHECKING:
    from gptkit.tokenizer import Tokenizer

HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # save_pretrained shards past 5 GB
HF_PYTORCH_BIN = "pytorch_model.bin"
HF_VOCAB = "vocab.json"  # GPT-2's encoder.json under HF's name
HF_MERGES = "merges.txt"  # GPT-2's vocab.bpe under HF's name
HF_TOKENIZER = "tokenizer.json"  # a `tokenizers` (fast tokenizer) file


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory whose config.json names a Hugging Face model_type."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # let the gptkit loader report the damaged file
    return isinstance(data, dict) and "model_type" in data


def read_hf(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, gptkit state dict) of the HF GPT-2 directory `path`; GptkitError if unusable."""
    path = Path(path)
    if not path.is_dir():
        raise GptkitError(f"Hugging Face model directory not found: {path}")
    hf_config = read_json(path / CONFIG_FILE, "Hugging Face config")
    config = config_from_hf(hf_config)
    hf_sd = _read_hf_weights(path)
    # Half-precision checkpoints become fp32, the dtype gptkit models are saved in.
    hf_sd = {k: v.float() if v.is_floating_point() else v for k, v in hf_sd.items()}
    return config, state_dict_from_hf(hf_sd, config)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: one safetensors file, its shards, or pytorch_model.bin."""
    from safetensors.torch import load_file

    if (path / HF_SAFETENSORS).is_file():
        files = [path / HF_SAFETENSORS]
    elif (path / HF_SAFETENSORS_INDEX).is_file():
        index = read_json(path / HF_SAFETENSORS_INDEX, "safetensors index")
        files = [path / name for name in sorted(set(index.get("weight_map", {}).values()))]
    elif (path / HF_PYTORCH_BIN).is_file():
        return _read_pytorch_bin(path / HF_PYTORCH_BIN)
    else:
        raise GptkitError(
            f"no weights in {path}: expected {HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX} "
            f"or {HF_PYTORCH_BIN}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise GptkitError(f"weights shard not found: {file}")
        try:
            tensors.update(load_file(file))
        except Exception as e:  # safetensors raises its own error type and OSError
            raise GptkitError(f"cannot read weights {file}: {_first_line(e)}") from None
    return tensors


def _read_pytorch_bin(file: Path) -> dict[str, torch.Tensor]:
    # weights_only: a pickle from the internet must not be able to run code.
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or unsafe pickles
        raise GptkitError(f"cannot read weights {file}: {_first_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GptkitError(f"{file} does not hold a state dict of tensors")
    return sd


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def hf_tokenizer(path: str | os.PathLike, vocab_size: int) -> tuple[Tokenizer | None, str]:
    """(tokenizer for the HF model in `path`, or None; a line saying what was chosen or why not)."""
    from gptkit.tokenizer import GPT2Tokenizer, _gpt2_data_dir

    path = Path(path)
    if vocab_size == GPT2_VOCAB_SIZE:
        vocab = path / HF_VOCAB
        if vocab.is_file():
            gpt2 = json.loads((_gpt2_data_dir() / "encoder.json").read_text(encoding="utf-8"))
            if read_json(vocab, "vocab file") != gpt2:
                return None, f"{vocab} is not GPT-2's vocabulary; no tokenizer was taken over"
        return GPT2Tokenizer(), "tokenizer: GPT-2's 50,257-token BPE"
    file = path / HF_TOKENIZER
    if file.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        from gptkit.tokenizer import BPETokenizer

        try:
            tok = BPETokenizer(HFTokenizer.from_file(str(file)))
        except Exception as e:  # not byte-level, no <|endoftext|>, or not a tokenizers file
            return None, f"{file} is not a byte-level BPE with <|endoftext|> ({_first_line(e)})"
        if tok.vocab_size > vocab_size:
            return None, f"{file} has {tok.vocab_size} tokens, the model only {vocab_size}"
        return tok, f"tokenizer: byte-level BPE from {file} ({tok.vocab_size} tokens)"
    return None, (
        f"vocab_size is {vocab_size}, not GPT-2's {GPT2_VOCAB_SIZE}, and {path} has no "
        f"{HF_TOKENIZER}: no tokenizer"
    )


def import_hf(src: str | os.PathLike, out: str | os.PathLike) -> str:
    """Convert the HF GPT-2 directory `src` into the gptkit model directory `out`.

    Returns a line describing the tokenizer that came along (or why none did).
    """
    config, sd = read_hf(src)
    tokenizer, note = hf_tokenizer(src, config.vocab_size)
    model = GPT(config)
    model.load_state_dict(sd)
    save_model(out, model)
    if tokenizer is not None:
        tokenizer.save(out)
    else:
        note += " (weights load with gptkit.checkpoint.load_model; sample/eval need tokenizer.json)"
    return note


def export_hf(src: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write the gptkit model in `src` as an HF GPT-2 directory `out` (safetensors, fp32).

    Seed-family models are refused (config_to_hf says why): transformers has no post-LN,
    sinusoidal or leaky-ReLU GPT-2. Returns a line describing the tokenizer files written.
    """
    from safetensors.torch import save_file

    from gptkit.tokenizer import load_tokenizer

    src, out = Path(src), Path(out)
    model = load_model(src)
    tokenizer = load_tokenizer(src) if (src / TOKENIZER_FILE).is_file() else None
    eot_id = None if tokenizer is None else tokenizer.eot_id
    hf_config = config_to_hf(model.config, eot_id) | {"torch_dtype": "float32"}
    if eot_id is None:  # unknown: not GPT2Config's default 50256, maybe outside the vocabulary
        hf_config |= {"bos_token_id": None, "eos_token_id": None}
    hf_sd = state_dict_to_hf(model.state_dict(), model.config)
    # Tied: HF re-ties lm_head to wte on load; safetensors refuses two names for one tensor.
    del hf_sd["lm_head.weight"]
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf_sd.items()}
    atomic_write_with(
        out / HF_SAFETENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    atomic_write_json(out / CONFIG_FILE, hf_config)
    return _export_tokenizer(tokenizer, out)


def _export_tokenizer(tokenizer: Tokenizer | None, out: Path) -> str:
    """Tokenizer files HF's AutoTokenizer reads, where an equivalent exists."""
    from gptkit.tokenizer import _gpt2_data_dir

    if tokenizer is None:
        return "no tokenizer.json in the source: no tokenizer files written"
    if tokenizer.kind == "gpt2":
        data = _gpt2_data_dir()
        for theirs, ours in ((HF_VOCAB, "encoder.json"), (HF_MERGES, "vocab.bpe")):
            atomic_write_with(out / theirs, lambda tmp, f=data / ours: shutil.copyfile(f, tmp))
        return f"tokenizer: GPT-2's ({HF_VOCAB}, {HF_MERGES})"
    if tokenizer.kind == "bpe":
        atomic_write_json(out / HF_TOKENIZER, tokenizer.to_json()["hf_tokenizer"])
        return f"tokenizer: the byte-level BPE as {HF_TOKENIZER}"
    return f"the {tokenizer.kind} tokenizer has no Hugging Face equivalent: none written"


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a gptkit model/run directory or an HF GPT-2 one.

    The one loader behind `gptkit sample` and `gptkit eval`.
    """
    from gptkit.checkpoint import load as load_gptkit

    if not is_hf_dir(path):
        return load_gptkit(path, device=device)
    config, sd = read_hf(path)
    tokenizer, note = hf_tokenizer(path, config.vocab_size)
    if tokenizer is None:
        raise GptkitError(f"cannot tokenize text for {path}: {note}")
    model = GPT(config)
    model.load_state_dict(sd)
    return model.to(device).eval(), tokenizer


def convert_dir(src: str | os.PathLike, out: str | os.PathLike, to: str) -> str:
    """`gptkit convert`: HF -> gptkit (`to="gptkit"`) or gptkit -> HF (`to="hf"`)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise GptkitError(f"model directory not found: {src}")
    if out.resolve() == src.resolve():
        raise GptkitError("OUT must differ from SRC: converting in place would mix both formats")
    if out.exists() and not out.is_dir():
        raise GptkitError(f"output {out} exists and is not a directory")
    # Converting writes config.json and tokenizer.json: a run or a prepared data directory
    # (train reads its tokenizer.json) would silently get another model's files.
    owned = {CONFIG_FILE: "a model", TOKENIZER_FILE: "a tokenizer", META_FILE: "prepared data"}
    for name, what in owned.items():
        if (out / name).exists():
            raise GptkitError(f"{out} already holds {what} ({name}); choose a new directory")
    if to == "gptkit":
        if not is_hf_dir(src):
            raise GptkitError(
                f"{src} is not a Hugging Face model directory (its config.json has no model_type)"
            )
        return import_hf(src, out)
    if to == "hf":
        if is_hf_dir(src):
            raise GptkitError(f"{src} is already a Hugging Face model directory")
        return export_hf(src, out)
    raise GptkitError(f"--to must be gptkit or hf, got {to!r}")
