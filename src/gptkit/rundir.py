"""Starting and resuming a run directory: the checks before the first step.

Option values, the prepared data, the guard against training over an existing checkpoint,
the guards on --resume (same tokenizer, vocabulary and model), the files written before
the first step, and the command line that resumes a stopped run.

    >>> check_train_config(cfg)
    >>> meta, train_tokens, val_tokens, tokenizer = open_data(cfg)
    >>> check_fresh_dir(Path(cfg.out))   # or check_resumable(...) with --resume
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit import checkpoint as ckpt
from gptkit.config import DEFAULT_PRESET, MODEL_OVERRIDES, GPTConfig, TrainConfig
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_bytes, atomic_write_json
from gptkit.metrics import METRICS_FILE, PLOT_FILE

RUN_FILES = (
    ckpt.CONFIG_FILE,
    ckpt.TRAIN_CONFIG_FILE,
    ckpt.TOKENIZER_FILE,
    ckpt.WEIGHTS_FILE,
    ckpt.TRAIN_STATE_FILE,
)


def check_train_config(cfg: TrainConfig) -> None:
    """GptkitError for option values no run can use."""
    at_least = {
        "batch_size": 1,
        "grad_accum": 1,
        "max_steps": 1,
        "log_every": 1,
        "eval_steps": 1,
        "warmup_steps": 0,
        "eval_every": 0,
        "save_every": 0,
    }
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise GptkitError(
                f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}"
            )
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise GptkitError(
                f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}"
            )
    if cfg.lr <= 0 or cfg.min_lr > cfg.lr:
        raise GptkitError(f"need 0 < --min-lr <= --lr, got lr {cfg.lr} and min-lr {cfg.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise GptkitError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0 < cfg.dist_timeout < math.inf:
        raise GptkitError(f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if cfg.max_time is not None and not cfg.max_time > 0:
        raise GptkitError(f"--max-time must be > 0 seconds, got {cfg.max_time}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise GptkitError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if not cfg.data:
        raise GptkitError("--data is required: a directory made by `gptkit prepare`")
    if not 0 <= cfg.seed < 2**63:  # torch's generators take 64 bits; ranks add to it
        raise GptkitError(f"--seed must be in [0, 2**63), got {cfg.seed}")


def open_data(cfg: TrainConfig) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, Any]]:
    """(meta, train tokens, val tokens, tokenizer json) of the prepared directory `cfg.data`."""
    from gptkit.data import load_meta, open_split
    from gptkit.tokenizer import tokenizer_from_json

    meta = load_meta(cfg.data)
    train_tokens, val_tokens = open_split(cfg.data, "train"), open_split(cfg.data, "val")
    file = Path(cfg.data) / ckpt.TOKENIZER_FILE
    tokenizer = ckpt.read_json(file, "data tokenizer")
    # The tokens were made by the tokenizer meta.json names; a tokenizer.json replaced since
    # (another `prepare` or `convert` into this directory) would train ids under wrong names.
    tok = tokenizer_from_json(tokenizer, file)
    made_with = (meta["tokenizer"], meta["vocab_size"], meta["eot_id"])
    if (tok.kind, tok.vocab_size, tok.eot_id) != made_with:
        raise GptkitError(
            f"{file} ({tok.kind}, {tok.vocab_size} tokens) is not the tokenizer "
            f"{cfg.data}'s tokens were made with ({meta['tokenizer']}, {meta['vocab_size']}); "
            "run `gptkit prepare` again"
        )
    return meta, train_tokens, val_tokens, tokenizer


def check_data_fits(cfg: TrainConfig, context_length: int, train_n: int, val_n: int) -> None:
    if train_n < context_length + 1:
        raise GptkitError(
            f"the train split of {cfg.data} has {train_n} tokens, fewer than context_length "
            f"+ 1 = {context_length + 1}; use a shorter --context-length or more data"
        )
    if cfg.eval_every and val_n < context_length + 1:
        raise GptkitError(
            f"the val split of {cfg.data} has {val_n} tokens, fewer than context_length + 1 = "
            f"{context_length + 1}; use a shorter --context-length, more data or --eval-every 0"
        )


def open_init(
    cfg: TrainConfig, tokenizer: dict[str, Any]
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """--init-from: (config, weights) of the model to fine-tune, checked against the data.

    The model brings its shape and its tokenizer, which must be the one `tokenizer` (the
    data's tokenizer.json) describes. --context-length may shorten the context (a learned
    position table keeps its first rows) and --dropout may change; nothing else may.
    """
    from gptkit.hf import is_hf_dir, load

    source = cfg.init_from
    shaped = [n for n in ("preset", "n_layer", "n_head", "d_model") if getattr(cfg, n) is not None]
    if shaped:
        raise GptkitError(
            f"--{shaped[0].replace('_', '-')} cannot be combined with --init-from: the model's "
            f"shape comes from {source}"
        )
    model, model_tokenizer = load(source)
    if model_tokenizer.to_json() != tokenizer:
        if model_tokenizer.kind == "gpt2":
            how = "prepare it with --tokenizer gpt2"
        elif is_hf_dir(source):
            how = f"convert {source} with `gptkit convert`, then prepare with --tokenizer OUT"
        else:
            how = f"prepare it with --tokenizer {source}"
        raise GptkitError(
            f"{cfg.data} was prepared with another tokenizer ({tokenizer.get('kind')!r}) than "
            f"{source}'s ({model_tokenizer.kind!r}); {how}"
        )
    config, weights = model.config, model.state_dict()
    if cfg.context_length is not None and cfg.context_length > config.context_length:
        raise GptkitError(
            f"--context-length {cfg.context_length} exceeds the {config.context_length} "
            f"positions of {source}"
        )
    try:
        config = dataclasses.replace(config, **cfg.model_overrides())
    except ValueError as e:
        raise GptkitError(str(e)) from None
    if "wpe.weight" in weights:  # a learned table: positions past the new context go
        weights["wpe.weight"] = weights["wpe.weight"][: config.context_length]
    return config, weights


def check_fresh_dir(run_dir: Path) -> None:
    """Never overwrite a checkpoint by starting a new run on top of it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GptkitError(f"--out {run_dir} exists and is not a directory")
    if (run_dir / ckpt.TRAIN_STATE_FILE).exists():
        raise GptkitError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it "
            "or choose another --out"
        )
    if (run_dir / ckpt.WEIGHTS_FILE).exists():  # a model directory: never train over it
        raise GptkitError(
            f"{run_dir} holds model weights but no {ckpt.TRAIN_STATE_FILE} to resume from; "
            "choose another --out (or --init-from it to fine-tune those weights)"
        )


def check_resumable(
    cfg: TrainConfig, run_dir: Path, meta: dict, tokenizer: dict, state: dict
) -> None:
    """The data and options given on --resume must be those the run was trained with."""
    run_tok = ckpt.read_json(run_dir / ckpt.TOKENIZER_FILE, "run tokenizer")
    if run_tok != tokenizer:
        kinds = f"{tokenizer.get('kind')!r} vs the run's {run_tok.get('kind')!r}"
        raise GptkitError(
            f"the tokenizer of {cfg.data} differs from the one {run_dir} was trained with "
            f"({kinds}); resume with the run's data or start a new --out"
        )
    saved = state["train_config"]
    started = saved.get("init_from")
    if cfg.init_from is not None and cfg.init_from != started:
        raise GptkitError(
            f"--init-from {cfg.init_from} differs from the run's ({started}); a resumed run "
            "continues from its checkpoint (drop --init-from)"
        )
    preset = saved.get("preset") or (None if started else DEFAULT_PRESET)
    if cfg.preset is not None and cfg.preset != preset:
        raise GptkitError(
            f"--preset {cfg.preset} differs from the run's ({preset or '--init-from'}); "
            "a resumed run keeps its model (drop the option or start a new --out)"
        )
    config = state["model_config"]
    if meta["vocab_size"] != config["vocab_size"]:
        raise GptkitError(
            f"{cfg.data} has a vocabulary of {meta['vocab_size']} but {run_dir} was trained "
            f"with {config['vocab_size']}; resume with the run's data or start a new --out"
        )
    for name, value in cfg.model_overrides().items():
        if value != config[name]:
            raise GptkitError(
                f"--{name.replace('_', '-')} {value} differs from the run's {config[name]}; "
                "a resumed run keeps its model (drop the option or start a new --out)"
            )
    if state["step"] >= cfg.max_steps:
        raise GptkitError(
            f"{run_dir} is already at step {state['step']} of --max-steps {cfg.max_steps}; "
            "raise --max-steps to train further"
        )


def with_model_origin(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """`cfg` with the resumed run's --preset / --init-from where left out: the train config
    saved at each checkpoint keeps saying where the model came from."""
    preset = cfg.preset or saved.get("preset")
    return dataclasses.replace(
        cfg, preset=preset, init_from=cfg.init_from or saved.get("init_from")
    )


def start_run_dir(cfg: TrainConfig, run_dir: Path, config: GPTConfig) -> None:
    """config.json, train_config.json and the data's tokenizer.json, before the first step."""
    # A kill -9 mid-write leaves the atomic writer's temporary file behind; sweep them.
    for name in (*RUN_FILES, METRICS_FILE, PLOT_FILE):
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    atomic_write_json(run_dir / ckpt.CONFIG_FILE, config.to_dict())
    atomic_write_json(run_dir / ckpt.TRAIN_CONFIG_FILE, cfg.to_dict())
    tok_bytes = (Path(cfg.data) / ckpt.TOKENIZER_FILE).read_bytes()
    atomic_write_bytes(run_dir / ckpt.TOKENIZER_FILE, tok_bytes)


def resume_command(cfg: TrainConfig, world_size: int = 1) -> str:
    """The `gptkit train` command line that continues this run with the same options.

    Resuming takes the model from the checkpoint but the training options (lr, max_steps,
    ...) from the command line, so every option that differs from its default is repeated.
    A run of several processes resumes under torchrun with as many: `--batch-size` is per
    process, so fewer would train on a smaller global batch.
    """
    parts = ["gptkit", "train"]
    if world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        nodes = f"--nnodes {world_size // local} " if local < world_size else ""
        parts = [f"torchrun {nodes}--nproc-per-node {local} -m gptkit train"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        # --init-from only starts a run: a resumed one takes its weights from its checkpoint.
        if f.name in ("resume", "init_from") or (
            f.name not in ("data", "out") and value == f.default
        ):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join([*parts, "--resume"])


def changed_options(
    saved: dict[str, Any],
    cfg: TrainConfig,
    saved_world: int | None = None,
    world_size: int = 1,
) -> list[str]:
    """Training options of a resumed run that differ from the ones it was saved with.

    With the saved run's process count known (`saved_world`; checkpoints before gptkit
    recorded it lack it), the global batch (batch size x grad accumulation x processes) is
    compared too: the same --batch-size on fewer processes changes it, and a new split of
    the same global batch is said to keep it.
    """
    # A resumed run keeps its model: check_resumable refuses model options that differ,
    # and left out they change nothing.
    ignore = {"data", "out", "resume", "preset", "init_from", *MODEL_OVERRIDES}
    changed = [
        f"--{k.replace('_', '-')} {saved[k]} -> {v}"
        for k, v in cfg.to_dict().items()
        if k not in ignore and k in saved and saved[k] != v
    ]
    if saved_world is not None:
        before = saved["batch_size"] * saved["grad_accum"] * saved_world
        after = cfg.batch_size * cfg.grad_accum * world_size
        if before != after:
            changed.append(
                f"global batch {before} -> {after} sequences (--batch-size x --grad-accum x "
                f"processes: {saved['batch_size']} x {saved['grad_accum']} x {saved_world} -> "
                f"{cfg.batch_size} x {cfg.grad_accum} x {world_size})"
            )
        elif any(c.startswith(("--batch-size ", "--grad-accum ")) for c in changed):
            changed.append(f"global batch unchanged ({after} sequences)")
    return changed
