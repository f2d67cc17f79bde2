"""The `gptkit` command line: one entry point, one plain typed function per subcommand.

    gptkit prepare INPUT... --out DIR --tokenizer gpt2|char|bpe
    gptkit train --data DIR --out RUN [--preset NAME | --init-from MODEL] [...]
    gptkit sample RUN --prompt TEXT
    gptkit convert SRC OUT [--to gptkit|hf]
    gptkit eval MODEL FILE... [--stride S] [--batch-size B] [--context-length N]
    gptkit serve RUN [--port 8000] [--api-key KEY] [--max-batch 32]
    gptkit demo
    gptkit explain RUN --prompt TEXT [--out DIR]
    gptkit presets
    gptkit plan PRESET --gpus N [--gpu h100] [--tokens 300B] [--strategy fsdp]

Flags are generated from each command function's signature (and from `TrainConfig`'s
fields for `train`), so a function's defaults are the CLI's defaults. User mistakes
(`GptkitError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gptkit.errors import GptkitError

if TYPE_CHECKING:
    import torch


def prepare(
    inputs: list[str],
    *,
    out: str,
    tokenizer: str = "gpt2",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    errors: Literal["strict", "replace"] = "strict",
) -> None:
    """Tokenize text files into train.bin / val.bin for training.

    Args:
        inputs: text files, directories (searched recursively) or glob patterns
        out: directory to write train.bin, val.bin, meta.json and tokenizer.json into
        tokenizer: gpt2 (OpenAI's BPE), char, bpe (trained here), or a model/run dir: its tokenizer
        vocab_size: vocabulary size for --tokenizer bpe
        val_fraction: share of the token stream (its tail) kept for validation
        errors: what to do with bytes that are not UTF-8: fail (strict) or replace them
    """
    from gptkit.data import prepare as prepare_data

    meta = prepare_data(
        inputs, out, tokenizer, vocab_size, val_fraction, errors, progress=_interactive()
    )
    print(
        f"{meta['documents']} documents, {meta['bytes']:,} bytes -> "
        f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['tokenizer']}, vocabulary {meta['vocab_size']:,}) in {out}"
    )


def train(**options: Any) -> None:
    """Train a GPT on prepared data; checkpoints, metrics and loss.png go to --out."""
    from gptkit.config import TrainConfig
    from gptkit.train import train_until_stopped

    run_dir, signum = train_until_stopped(TrainConfig(**options), progress=_interactive())
    if signum is not None:  # saved, and told how to resume; but the run did not finish
        raise SystemExit(128 + signum)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"run saved in {run_dir}; sample it with: gptkit sample {run_dir}")


def sample(
    run: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    device: str = "cpu",
    weights: Literal["fp32", "bf16", "int8"] = "fp32",
    kv_cache: Literal["fp32", "bf16"] = "fp32",
) -> None:
    """Generate text from a trained model, streamed to stdout as it is produced.

    Args:
        run: run or model directory, or a Hugging Face GPT-2 directory
        prompt: text to continue (empty: start from end-of-text)
        max_new_tokens: tokens to generate per sample (fewer if end-of-text comes first)
        temperature: divide the logits by this; 0 picks the most likely token
        top_k: sample only among the K most likely tokens
        top_p: sample only among the smallest set of tokens whose probability reaches P
        num_samples: how many independent samples to write
        seed: random seed, for reproducible samples
        device: cpu, cuda, or cuda:N
        weights: fp32, or weight-only bf16 / int8 (per-channel scales): 2x / 4x fewer bytes
        kv_cache: fp32, or bf16: half the bytes each token reads from the KV cache (long texts)
    """
    import torch

    from gptkit.generate import stream_text, validate_sampling
    from gptkit.hf import load  # gptkit or Hugging Face directories
    from gptkit.model import KV_CACHE_DTYPES
    from gptkit.quantize import quantize_model

    device = _device(device)
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    if num_samples < 1:
        raise GptkitError(f"--num-samples must be >= 1, got {num_samples}")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise GptkitError(f"--seed must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")
    model, tokenizer = load(run, device=device)
    model = quantize_model(model, weights)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    tokenizer.encode(prompt)  # a character a char vocabulary lacks: fail before any output
    for i in range(num_samples):
        if num_samples > 1:
            print(f"{'-' * 20} sample {i + 1} {'-' * 20}", flush=True)
        sys.stdout.write(prompt)
        pieces = stream_text(
            model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, generator,
            kv_dtype=KV_CACHE_DTYPES[kv_cache],
        )  # fmt: skip
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    sys.stdout.flush()


def convert(src: str, out: str, to: Literal["gptkit", "hf"] = "gptkit") -> None:
    """Convert a Hugging Face GPT-2 directory to a gptkit model directory, or back.

    Args:
        src: Hugging Face GPT-2 directory (with --to hf: a gptkit model or run directory)
        out: directory to write the converted model into
        to: gptkit (import a Hugging Face model) or hf (export a gpt2-family gptkit model)
    """
    from gptkit.hf import convert_dir

    note = convert_dir(src, out, to)
    print(f"wrote {out}; {note}")


def evaluate(
    model: str,
    files: list[str],
    stride: int | None = None,
    batch_size: int = 8,
    context_length: int | None = None,
    device: str = "cpu",
) -> None:
    """Mean loss, perplexity and bits per byte of a model on text files (sliding window).

    Args:
        model: gptkit run or model directory, or a Hugging Face GPT-2 directory
        files: UTF-8 text files, each scored as one document
        stride: tokens between window starts (default: half the context length)
        batch_size: windows per forward pass
        context_length: window length in tokens (default: the model's context length)
        device: cpu, cuda, or cuda:N
    """
    from gptkit.evaluate import EvalResult, evaluate_files, format_result
    from gptkit.hf import load

    device = _device(device)
    loaded, tokenizer = load(model, device=device)
    results = evaluate_files(loaded, tokenizer, files, context_length, stride, batch_size)
    for name, result in results:
        print(format_result(name, result))
    if len(results) > 1:
        total = sum((r for _, r in results), EvalResult(0.0, 0, 0))
        print(format_result(f"total ({len(results)} files)", total))


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    device: str = "cpu",
    weights: Literal["fp32", "bf16", "int8"] = "fp32",
    kv_cache: Literal["fp32", "bf16"] = "fp32",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a playground at /.

    Args:
        model: run or model directory (config.json, model.safetensors, tokenizer.json)
        host: address to listen on
        port: TCP port to listen on
        api_key: require 'Authorization: Bearer KEY' on /v1/ endpoints
        max_batch: sequences decoded together per step (1 turns batching off)
        max_queue: sequences that may wait beyond the free slots before requests get 429
        device: cpu, cuda, or cuda:N
        weights: fp32, or weight-only bf16 / int8 (per-channel scales): 2x / 4x fewer bytes
        kv_cache: fp32, or bf16: half the KV cache's memory per slot and bytes read per token
    """
    from gptkit.serve import serve as run_server

    device = str(_device(device))
    if max_batch < 1 or max_queue < 0:
        raise GptkitError("--max-batch must be >= 1 and --max-queue >= 0")
    if not 0 <= port <= 65535:
        raise GptkitError(f"--port must be in [0, 65535], got {port}")
    run_server(model, host, port, api_key, max_batch, max_queue, device, weights, kv_cache)


def demo(
    data: str | None = None,
    out: str = "runs/demo",
    minutes: float = 5.0,
    seed: int = 1337,
) -> None:
    """Train a small spec-style GPT on this machine in minutes, then print samples.

    Args:
        data: your own text: one file, directory or glob; default: Python's standard library
        out: run directory (the prepared data goes in OUT/data)
        minutes: training time budget
        seed: random seed for training and sampling
    """
    from gptkit.demo import run_demo

    run_demo(data, out, minutes, seed)


def explain(
    model: str,
    *,
    prompt: str,
    out: str | None = None,
    top_k: int = 10,
    top_p: float = 0.9,
    device: str = "cpu",
) -> None:
    """Show the model's steps on a prompt: tokens, embeddings, attention, norms, FFN, next token.

    Args:
        model: run or model directory, or a Hugging Face GPT-2 directory
        prompt: text to run through the model (at most its context length in tokens)
        out: directory for attention.png, norms_and_top.png and a self-contained explain.html
        top_k: how many of the most likely next tokens to list
        top_p: mark the smallest set of next tokens whose probability reaches P (the top-p cut)
        device: cpu, cuda, or cuda:N
    """
    from gptkit.explain import check_cut, explain, render_text, write_report
    from gptkit.hf import load  # gptkit or Hugging Face directories

    device = _device(device)
    check_cut(top_k, top_p)  # option mistakes before the (slow) model load
    net, tokenizer = load(model, device=device)
    ex = explain(net, tokenizer, prompt, top_k, top_p)
    print(render_text(ex))
    if out is not None:
        files = write_report(ex, out)
        print(f"\nwrote {', '.join(str(f) for f in files)}")


def presets() -> None:
    """List the model presets with their shapes and parameter counts."""
    from gptkit.config import PRESETS, GPTConfig

    print(
        f"{'preset':<12} {'pos':<10} {'norm':<5} {'act':<10} {'layers':>6} "
        f"{'d_model':>7} {'heads':>5} {'context':>7} {'params':>10}"
    )
    for name in PRESETS:
        c = GPTConfig.from_preset(name)
        print(
            f"{name:<12} {c.positional:<10} {c.norm:<5} {c.activation:<10} {c.n_layer:>6} "
            f"{c.d_model:>7} {c.n_head:>5} {c.context_length:>7} "
            f"{_human(c.num_parameters()):>10}"
        )


def plan(
    preset: str,
    *,
    gpus: int,
    gpu: str = "h100",
    tokens: str | None = None,
    mfu: float = 0.4,
    strategy: Literal["ddp", "fsdp"] = "ddp",
    micro_batch: int = 1,
    activation_checkpointing: bool = False,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    context_length: int | None = None,
    eager: bool = False,
) -> None:
    """Estimate parameters, FLOPs, memory per device and time to train a preset.

    Args:
        preset: model preset (see `gptkit presets`)
        gpus: number of devices
        gpu: h100, h100-pcie, h100-nvl, h200, h200-nvl, gh200, b200, a100(-40gb), l40s, l4, mi300x
        tokens: training tokens, e.g. 300e9 or 300B (default: 20 per parameter)
        mfu: model FLOPs utilisation to assume (share of the dense bf16 peak)
        strategy: ddp (replicate everything) or fsdp (shard weights, grads, optimizer)
        micro_batch: sequences per device per forward/backward
        activation_checkpointing: keep only block inputs, recompute in backward
        dtype: compute dtype (bfloat16 autocast or float32)
        context_length: override the preset's context length
        eager: plan a run without --compile (ATen's loss keeps fp32 log-probabilities)
    """
    from gptkit.config import GPTConfig
    from gptkit.plan import estimate, parse_count, report

    overrides = {} if context_length is None else {"context_length": context_length}
    try:
        config = GPTConfig.from_preset(preset, **overrides)
    except ValueError as e:
        raise GptkitError(str(e)) from None
    count = None if tokens is None else parse_count(tokens)
    path = "eager" if eager else "compiled"
    p = estimate(
        config, gpus, gpu, count, mfu, strategy, micro_batch, activation_checkpointing, dtype, path
    )
    print(report(p, preset, tokens_given=tokens is not None))


# What torch.Generator.manual_seed accepts (it wraps negative seeds modulo 2**64).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _device(name: str) -> torch.device:
    """The device `name` names, checked first: an unusable one is a one-line error."""
    from gptkit.train import resolve_device

    return resolve_device(name)


def _interactive() -> bool:
    """Progress bars only on a terminal: in logs and pipes they are noise."""
    return sys.stderr.isatty()


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# --- argument parsing ------------------------------------------------------------------


@dataclass
class _Param:
    name: str
    annotation: Any
    default: Any  # REQUIRED, POSITIONAL, or the default value
    help: str


# Positional: a function parameter without a default. A required flag: a keyword-only
# parameter without a default, or a dataclass field without one.
POSITIONAL = inspect.Parameter.empty
REQUIRED = dataclasses.MISSING


def _docstring_help(fn: Callable) -> dict[str, str]:
    """The `name: text` lines of a Google-style Args section."""
    doc = inspect.getdoc(fn) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return dict(re.findall(r"^\s+(\w+): (.+)$", args, flags=re.MULTILINE))


def _function_params(fn: Callable) -> list[_Param]:
    hints, helps = typing.get_type_hints(fn), _docstring_help(fn)
    params = []
    for p in inspect.signature(fn).parameters.values():
        default = p.default
        if p.kind is inspect.Parameter.KEYWORD_ONLY and default is POSITIONAL:
            default = REQUIRED
        params.append(_Param(p.name, hints[p.name], default, helps.get(p.name, "")))
    return params


def _dataclass_params(cls: type) -> list[_Param]:
    hints = typing.get_type_hints(cls)
    return [
        _Param(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


def _add_params(parser: argparse.ArgumentParser, params: list[_Param]) -> None:
    for p in params:
        kind, choices, is_list = _unwrap(p.annotation)
        if p.default is POSITIONAL:
            parser.add_argument(p.name, type=kind, nargs="+" if is_list else None, help=p.help)
            continue
        flag = "--" + p.name.replace("_", "-")
        if kind is bool:
            action = argparse.BooleanOptionalAction if p.default else "store_true"
            parser.add_argument(flag, action=action, default=p.default, help=p.help)
            continue
        if p.default is REQUIRED:
            parser.add_argument(flag, type=kind, choices=choices, required=True, help=p.help)
            continue
        shown = "" if p.default in (None, "") else f" (default: {p.default})"
        parser.add_argument(
            flag, type=kind, choices=choices, default=p.default, help=p.help + shown
        )


def _unwrap(annotation: Any) -> tuple[type, list | None, bool]:
    """(element type, choices, is_list) for the annotations our commands use."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return type(args[0]), list(args), False
    if origin is list:
        return args[0], None, True
    if args and type(None) in args:  # X | None
        return _unwrap(next(a for a in args if a is not type(None)))
    return annotation, None, False


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (plus where to find help)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


COMMANDS: dict[str, Callable[..., None]] = {
    "prepare": prepare,
    "train": train,
    "sample": sample,
    "convert": convert,
    "eval": evaluate,
    "serve": serve,
    "demo": demo,
    "explain": explain,
    "presets": presets,
    "plan": plan,
}


def build_parser() -> argparse.ArgumentParser:
    from gptkit import __version__
    from gptkit.config import TrainConfig

    parser = _Parser(prog="gptkit", description="Train, sample and inspect GPT language models.")
    parser.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.splitlines()[0] if doc else ""
        cmd = sub.add_parser(name, help=summary, description=summary)
        params = _dataclass_params(TrainConfig) if name == "train" else _function_params(fn)
        _add_params(cmd, params)
        cmd.set_defaults(_fn=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting (libgomp spins 300,000 times by default) make
    # every step 4-15x slower as soon as another process holds a core; threads that never
    # spin (OMP_WAIT_POLICY=PASSIVE) cost 5-8% when the machine is quiet. A short spin is
    # within 3-8% of the best of both (measured on a 2-core machine: benchmarks/RESULTS.md).
    # Read when torch loads; the user's own settings win.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command")
    try:
        fn(**args)
    except GptkitError as e:
        # Under torchrun every process meets the same bad option or missing file: one
        # line per node (its first process), not one per process.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            rank = os.environ.get("RANK", "0")
            print(f"gptkit: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptkit sample ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    return 0
