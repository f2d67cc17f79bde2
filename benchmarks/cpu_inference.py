"""CPU decoding against the memory-bandwidth ceiling: fp32, bf16 and int8 weights, one run.

1. Memory read bandwidth: the best of a few sums over a 1 GiB fp32 tensor (far larger
   than any cache), at the thread count decoding uses, measured again right before every
   timed decode: on a shared machine the bandwidth left to us changes by the minute.
2. Decode tokens/s at batch 1 for the `gpt2` preset (124M, random weights, greedy, KV
   cache) with fp32, bf16 and int8 weights (`quantize_model`: weight-only, read by the
   native kernel where it builds); the ceiling of each is bandwidth / bytes of weights
   read per token (gptkit.quantize.weight_bytes_per_token; the KV cache is left out: at
   the ~50 positions of this run it adds ~3.5 MB, 0.7% of fp32's bytes and 2.8% of
   int8's). Decode speed counts the steps after the first new token (no prefill). The
   kinds take turns, `--repeats`
   rounds; the table shows the median over rounds of tokens/s and of tokens/s over the
   ceiling of the moment, and each kind's speed-up over fp32 against its byte ratio.
   Where a token's time went, per kind (medians, ms per token): the matrix-vector products
   inside the native decode step (`kernels.decode_profile`), attention over the KV cache,
   the rest of the op (norms, activations, embeddings), and the Python around the op
   (sampling, the checks that pick the native path, its argument list). Only the products
   scale with the bytes of the weights; "products x fp32" is their own speed-up.
3. Perplexity on held-out text: a small model trained briefly on Shakespeare (characters),
   evaluated on the whole val split with each kind of weights (whole sequences: ATen's
   kernels for fp32, the native kernel 8 rows at a time for int8 and blocked bf16), and
   again through the decode path users sample with: 64 windows of 128
   characters fed one token per step, 8 rows at a time, through the KV cache (the native
   decode step, where it builds), with a fp32 and with a bf16 cache.

    .venv/bin/python benchmarks/cpu_inference.py
    .venv/bin/python benchmarks/cpu_inference.py --train-steps 0   # skip the perplexity part
    .venv/bin/python benchmarks/cpu_inference.py --tiny --text FILE  # a dry run, seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptkit import kernels
from gptkit.config import GPTConfig, TrainConfig
from gptkit.fileio import atomic_write_json
from gptkit.generate import generate, stream
from gptkit.model import GPT, KVCache
from gptkit.quantize import quantize_model, weight_bytes_per_token

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
WEIGHTS = ("fp32", "bf16", "int8")
# The perplexity part's char model and its decode-path windows; --tiny shrinks both.
PERPLEXITY = {
    False: dict(n_layer=4, n_head=4, d_model=128, context_length=128, batch_size=16, windows=64),
    True: dict(n_layer=2, n_head=2, d_model=64, context_length=32, batch_size=4, windows=8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and buffer (a dry run)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--repeats", type=int, default=5, help="rounds (each kind once per round)")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument(
        "--train-steps", type=int, default=None,
        help="default 300 (--tiny: 2); 0 skips the perplexity part",
    )  # fmt: skip
    p.add_argument("--text", default=str(SHAKESPEARE), help="text for the perplexity part")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.train_steps is None:
        args.train_steps = 2 if args.tiny else 300
    return args


def model_config(tiny: bool) -> GPTConfig:
    """The decoded model: `gpt2` (124M), or a tiny gpt2-family model for a dry run."""
    if tiny:
        return GPTConfig.from_preset(
            "gpt2", vocab_size=512, context_length=128, n_layer=2, n_head=2, d_model=64
        )
    return GPTConfig.from_preset("gpt2")


def read_bandwidth(repeats: int = 5, gib: float = 1.0) -> float:
    """Bytes/s of the best `sum` over a tensor of `gib` GiB."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # touch every page first
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


PHASES = ("products", "attention", "other", "around")


def decode_speed(model: GPT, new_tokens: int) -> tuple[float, dict[str, float]]:
    """Decode tokens/s of one greedy batch-1 generation after a 16-token prompt, and where a
    token's time went: seconds per token of each of PHASES (all zero without the native
    decode step).

    Timed from the first new token to the last: the decode steps alone, without the
    prompt's prefill (time to first token, a different measure).
    """
    idx = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator())
    kernels.decode_profile(reset=True)
    times = [time.perf_counter() for _ in stream(model, idx, new_tokens + 1, temperature=0)]
    per_token = (times[-1] - times[0]) / new_tokens
    profile = kernels.decode_profile(reset=True)
    phases = dict.fromkeys(PHASES, 0.0)
    if profile and profile["steps"] == new_tokens:
        for name in PHASES[:3]:
            phases[name] = profile[name] / new_tokens
        phases["around"] = per_token - sum(phases.values())
    return 1.0 / per_token, phases


def perplexities(text: str, steps: int, tiny: bool = False) -> dict[str, Any]:
    """Train a small char model for `steps` steps; val perplexity with each kind of weights."""
    from gptkit.checkpoint import load_model
    from gptkit.data import open_split, prepare
    from gptkit.train import evaluate_full, train

    size = dict(PERPLEXITY[tiny])
    windows, T, batch = size.pop("windows"), size["context_length"], size["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        prepare([text], str(data), "char", None, 0.1, "strict", progress=False)
        cfg = TrainConfig(
            data=str(data), out=str(out), preset="gpt2", **size, max_steps=steps,
            warmup_steps=min(50, steps), lr=2e-3, min_lr=2e-4, eval_every=0, device="cpu",
        )  # fmt: skip
        start = time.perf_counter()
        train(cfg, progress=False)
        train_s = time.perf_counter() - start
        val = np.asarray(open_split(data, "val"))
        result: dict[str, Any] = {"train_steps": steps, "train_seconds": train_s}
        result["windows"], result["window_tokens"] = windows, T
        for w in WEIGHTS:
            model = quantize_model(load_model(out), w)
            result[w] = math.exp(evaluate_full(model, val, batch, T))
            result[f"{w}_decode"] = decode_perplexity(model, val, windows, T=T)
            result[f"{w}_decode_kv_bf16"] = decode_perplexity(
                model, val, windows, T=T, kv_dtype=torch.bfloat16
            )
    return result


def decode_perplexity(
    model: GPT,
    tokens: np.ndarray,
    windows: int = 64,
    rows: int = 8,
    T: int = 128,
    kv_dtype: torch.dtype = torch.float32,
) -> float:
    """Perplexity of `windows` consecutive windows of T + 1 tokens, each predicted one step at
    a time through a KV cache of `kv_dtype` (`next_logits`), `rows` windows side by side."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, windows, rows):
            windows_np = [tokens[(first + r) * T : (first + r + 1) * T + 1] for r in range(rows)]
            batch = torch.from_numpy(np.stack(windows_np).astype(np.int64))  # (rows, T + 1)
            cache = KVCache(model.config, rows, T, ring_buffers=False, dtype=kv_dtype)
            for t in range(T):
                logits = model.next_logits(batch[:, t : t + 1], cache)  # (rows, V)
                nll += float(F.cross_entropy(logits.float(), batch[:, t + 1], reduction="sum"))
                count += rows
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    torch.manual_seed(0)
    base = GPT(model_config(args.tiny)).eval()
    models = {w: quantize_model(copy.deepcopy(base), w) for w in WEIGHTS}
    del base
    for model in models.values():
        generate(model, torch.zeros(1, 16, dtype=torch.long), 4, temperature=0)  # warm-up
    gib = 1 / 64 if args.tiny else 1.0  # --tiny: 16 MiB, no longer past the caches
    rounds: dict[str, list[tuple[float, float]]] = {w: [] for w in WEIGHTS}  # (GB/s, tok/s)
    phases: dict[str, list[dict[str, float]]] = {w: [] for w in WEIGHTS}
    for _ in range(args.repeats):
        for w, model in models.items():
            bandwidth = read_bandwidth(repeats=3, gib=gib) / 1e9
            speed, spent = decode_speed(model, args.new_tokens)
            rounds[w].append((bandwidth, speed))
            phases[w].append(spent)
    bandwidths = [gb for w in WEIGHTS for gb, _ in rounds[w]]
    result["read_bandwidth_gb_s"] = statistics.median(bandwidths)
    print(
        f"memory read bandwidth: median {statistics.median(bandwidths):.1f} GB/s, range "
        f"{min(bandwidths):.1f}-{max(bandwidths):.1f} ({torch.get_num_threads()} threads)"
    )
    print(
        f"{'weights':<8} {'MB/token':>9} {'tok/s':>7} {'of ceiling':>10} "
        f"{'x fp32':>7} {'bytes / fp32':>13}"
    )
    fp32_bytes = weight_bytes_per_token(models["fp32"])
    for w, model in models.items():
        per_token = weight_bytes_per_token(model)
        speed = statistics.median(tps for _, tps in rounds[w])
        of_ceiling = statistics.median(tps * per_token / (gb * 1e9) for gb, tps in rounds[w])
        result[w] = {
            "bytes_per_token": per_token,
            "rounds_gb_s_tok_s": rounds[w],
            "tokens_per_s": speed,
            "of_ceiling": of_ceiling,
            "ms_per_token": {p: 1e3 * statistics.median(r[p] for r in phases[w]) for p in PHASES},
        }
        speedup = speed / result["fp32"]["tokens_per_s"]
        print(
            f"{w:<8} {per_token / 1e6:9.1f} {speed:7.1f} {of_ceiling:10.0%} "
            f"{speedup:6.2f}x {fp32_bytes / per_token:12.2f}x"
        )
    if result["fp32"]["ms_per_token"]["products"] > 0:
        print(
            f"ms per token: {'products':>9} {'(GB/s)':>7} {'x fp32':>7} "
            + " ".join(f"{p:>9}" for p in PHASES[1:])
        )
        fp32_products = result["fp32"]["ms_per_token"]["products"]
        for w in WEIGHTS:
            ms = result[w]["ms_per_token"]
            gb_s = result[w]["bytes_per_token"] / ms["products"] / 1e6
            result[w]["products_gb_s"] = gb_s
            print(
                f"{w:<13} {ms['products']:9.2f} {gb_s:7.1f} {fp32_products / ms['products']:6.2f}x "
                + " ".join(f"{ms[p]:9.2f}" for p in PHASES[1:])
            )
    del models
    if args.train_steps:
        ppl = perplexities(args.text, args.train_steps, args.tiny)
        result["perplexity"] = ppl
        print(
            f"val perplexity after {args.train_steps} steps ({ppl['train_seconds']:.0f} s): "
            + ", ".join(f"{w} {ppl[w]:.4f}" for w in WEIGHTS)
            + f"; int8/fp32 - 1 = {ppl['int8'] / ppl['fp32'] - 1:+.3%}"
        )
        print(
            f"decode-path perplexity ({ppl['windows']} x {ppl['window_tokens']} characters, "
            "one step at a time): "
            + ", ".join(f"{w} {ppl[w + '_decode']:.4f}" for w in WEIGHTS)
            + f"; int8/fp32 - 1 = {ppl['int8_decode'] / ppl['fp32_decode'] - 1:+.3%}"
        )
        print(
            "the same with a bf16 KV cache (--kv-cache bf16): "
            + ", ".join(
                f"{w} {ppl[w + '_decode_kv_bf16']:.4f} "
                f"({ppl[w + '_decode_kv_bf16'] / ppl[w + '_decode'] - 1:+.3%})"
                for w in WEIGHTS
            )
        )
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
