"""Checkpoints: a run directory is also a model directory (DESIGN.md §3).

Files, each written atomically (temporary file, fsync, rename):

    config.json          GPTConfig.to_dict()
    model.safetensors    the weights, fp32; a tied `lm_head.weight` is stored once (as wte)
    tokenizer.json       copied from the prepared data directory
    train_config.json    TrainConfig.to_dict() (written by the trainer)
    train_state.pt       everything needed to resume exactly, weights included

Usage:

    >>> model, tokenizer = load("runs/demo")        # also `gptkit.load`
    >>> model = load_model("runs/demo", device="cuda", dtype=torch.bfloat16)

Files are replaced one at a time, so a kill between two renames can leave them from
different saves. Hence: `train_state.pt` carries its own copy of the weights and resuming
reads it alone; `model.safetensors` carries a copy of its config in its metadata, which
`load_model` trusts over a stale config.json. Every file on disk is always complete.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_json, atomic_write_with
from gptkit.model import GPT

if TYPE_CHECKING:
    from gptkit.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_CONFIG_FILE = "train_config.json"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_VERSION = 1
TRAIN_STATE_KEYS = (  # what gptkit.train.train_state writes and resuming reads
    "version", "step", "tokens_seen", "best_val_loss", "elapsed", "model_config",
    "train_config", "model", "optimizer", "rng", "data_rng",
)  # fmt: skip
TIED_KEY = "lm_head.weight"
CONFIG_METADATA_KEY = "gptkit_config"  # model.safetensors carries its own config.json copy


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a `torch.compile` wrapper (its state-dict keys lack `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def weights_for_save(
    model: nn.Module, dtype: torch.dtype | None = torch.float32
) -> dict[str, torch.Tensor]:
    """The model's tensors as safetensors wants them: contiguous CPU copies, tied ones once."""
    model = unwrap(model)
    state = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state.pop(TIED_KEY, None)  # the same storage as wte.weight; safetensors refuses shared
    out = {}
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu").contiguous().clone()
    return out


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    config: GPTConfig | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> None:
    """Write `model.safetensors` and `config.json` into `directory` (fp32 unless `dtype`).

    Each file is replaced atomically, weights first. The weights also carry the config in
    their metadata: a kill between the two renames (or a failed config write) leaves new
    weights beside an old config.json, and `load_model` then trusts the weights' copy.
    """
    config = unwrap(model).config if config is None else config
    save_weights(directory, weights_for_save(model, dtype), config)


def save_weights(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: GPTConfig
) -> None:
    """`save_model` for tensors already gathered (`weights_for_save`'s form, e.g. from FSDP)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    atomic_write_with(
        directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata)
    )
    atomic_write_json(directory / CONFIG_FILE, config.to_dict())


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a GptkitError naming the file."""
    if not path.is_file():
        raise GptkitError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptkitError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise GptkitError(f"{what} {path} does not hold a JSON object")
    return data


def load_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig in `path` (a model directory or its config.json)."""
    path = Path(path)
    if not path.exists():
        raise GptkitError(f"model directory not found: {path}")
    file = path / CONFIG_FILE if path.is_dir() else path
    return _config_from(read_json(file, "model config"), file)


def _config_from(data: dict[str, Any], source: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise GptkitError(f"invalid model config {source}: {e}") from None


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or a GptkitError naming it."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise GptkitError(f"model weights not found: {file}")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptkitError(f"corrupt or truncated weights file {file}: {reason}") from None


def load_weights(model: GPT, tensors: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy `tensors` into `model`, or a GptkitError listing what is missing/extra/mis-shaped."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop(TIED_KEY, None)
        tensors = {k: v for k, v in tensors.items() if k != TIED_KEY}  # tolerate a stored copy
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped {_few(shapes)}")
    if problems:
        raise GptkitError(f"weights in {source} do not fit its config: {'; '.join(problems)}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> GPT:
    """The GPT saved in directory `path` (config.json + model.safetensors), in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise GptkitError(f"model directory not found: {path}")
    config = load_config(path)
    file = path / WEIGHTS_FILE
    tensors, metadata = _read_safetensors(file)
    if CONFIG_METADATA_KEY in metadata:  # the config saved with these very weights
        try:
            embedded = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError:
            raise GptkitError(f"corrupt config metadata in {file}") from None
        config = _config_from(embedded, file)
    model = GPT(config)
    load_weights(model, tensors, file)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a model or run directory."""
    from gptkit.tokenizer import load_tokenizer

    model = load_model(path, device=device)
    tok_file = Path(path) / TOKENIZER_FILE
    if not tok_file.is_file():
        raise GptkitError(f"tokenizer not found: {tok_file}")
    tokenizer = load_tokenizer(tok_file)
    if tokenizer.vocab_size > model.config.vocab_size:  # its ids would fall off the model
        raise GptkitError(
            f"{tok_file} has {tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model, tokenizer


# --- training state -------------------------------------------------------------------------


def save_train_state(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write `state` (tensors and primitive containers only) to train_state.pt."""
    atomic_write_with(Path(directory) / TRAIN_STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The dict saved by `save_train_state`, loaded with `weights_only=True` onto the CPU."""
    file = Path(directory) / TRAIN_STATE_FILE
    if not file.is_file():
        raise GptkitError(f"nothing to resume in {directory} (no {TRAIN_STATE_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptkitError(f"cannot read training state {file}: {reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in TRAIN_STATE_KEYS):
        raise GptkitError(f"{file} is not a gptkit training state")
    if state["version"] != TRAIN_STATE_VERSION:
        found = state["version"]
        raise GptkitError(f"{file} has version {found!r}; this gptkit reads {TRAIN_STATE_VERSION}")
    return state


def capture_rng() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and primitives (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
