"""Long generations on a CPU: a fp32 against a bf16 KV cache, side by side in one run.

At position p every decode step reads all p cached keys and values of every layer, 2 x
n_layer x p x d_model values: for the `gpt2` preset 73.7 KB per position in fp32, 70.8 MB
at position 960, more than an int8 model's weights (~125 MB) read per token at ~1,700
positions. `--kv-cache bf16` (`kv_dtype=torch.bfloat16`) halves those bytes.

For the `gpt2` preset (124M, random weights) with each kind of `--weights`, a random
prompt fills the cache up to each of `--positions`; then `--new-tokens` decode steps run
from there through `GPT.next_logits` (the native decode step where it builds), the cache
rewound to the same position before every round. The (weights, cache) pairs take turns,
`--repeats` rounds; the table shows median ms per token, the part of it spent in attention
over the cache (`kernels.decode_profile`), and bf16's speed-up over fp32 per token.

    .venv/bin/python benchmarks/kv_cache.py
    .venv/bin/python benchmarks/kv_cache.py --positions 64,960 --weights int8 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from gptkit import kernels
from gptkit.config import GPTConfig
from gptkit.fileio import atomic_write_json
from gptkit.model import GPT, KV_CACHE_DTYPES, KVCache
from gptkit.quantize import quantize_model


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="128,512,960", help="cache fill before decoding")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per round")
    p.add_argument("--weights", default="fp32,int8", help="kinds of weights, e.g. fp32,int8")
    p.add_argument("--repeats", type=int, default=7, help="rounds (each pair once per round)")
    p.add_argument("--preset", default="gpt2", help="model preset (random weights)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.positions = [int(x) for x in _csv(args.positions)]
    args.weights = _csv(args.weights)
    return args


def cache_bytes(cache: KVCache) -> int:
    """Bytes the cache's keys and values take (all positions it holds, every layer)."""
    return sum(t.nbytes for t in (cache.k, cache.v, cache.ring_k, cache.ring_v))


def decode_round(model: GPT, cache: KVCache, ids: torch.Tensor, start: int) -> tuple[float, float]:
    """(ms per token, ms of attention per token) of decoding ids (1, N) from position
    `start` of a cache already filled that far."""
    cache.pos = start  # rewind: the positions from here on are written again
    kernels.decode_profile(reset=True)
    begin = time.perf_counter()
    with torch.inference_mode():
        for t in range(ids.shape[1]):
            model.next_logits(ids[:, t : t + 1], cache)
    per_token = (time.perf_counter() - begin) / ids.shape[1]
    profile = kernels.decode_profile(reset=True)
    attention = profile["attention"] / profile["steps"] if profile and profile["steps"] else 0.0
    return 1e3 * per_token, 1e3 * attention


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset(args.preset)).eval()
    models = {w: quantize_model(copy.deepcopy(base), w) for w in args.weights}
    cfg, n = base.config, args.new_tokens
    del base
    if max(args.positions) + n > cfg.context_length:
        raise SystemExit(f"positions + new tokens must fit the context ({cfg.context_length})")
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    print(
        f"{'position':>8} {'weights':<7} {'fp32 ms':>8} {'(attn)':>7} {'bf16 ms':>8} "
        f"{'(attn)':>7} {'bf16 x':>7}"
    )
    for position in args.positions:
        ids = torch.randint(0, cfg.vocab_size, (1, position + n))
        caches = {}
        with torch.inference_mode():
            for w, model in models.items():
                for kv, dtype in KV_CACHE_DTYPES.items():
                    cache = KVCache(cfg, 1, position + n, dtype=dtype)
                    model(ids[:, :position], cache)  # the prefill
                    caches[w, kv] = cache
                    decode_round(model, cache, ids[:, position:], position)  # warm-up
        times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in caches}
        for _ in range(args.repeats):
            for (w, kv), cache in caches.items():
                times[w, kv].append(decode_round(models[w], cache, ids[:, position:], position))
        for w in models:
            row = {}
            for kv in KV_CACHE_DTYPES:
                row[kv] = {
                    "ms_per_token": statistics.median(t for t, _ in times[w, kv]),
                    "attention_ms": statistics.median(a for _, a in times[w, kv]),
                    "rounds": times[w, kv],
                    "cache_bytes": cache_bytes(caches[w, kv]),
                }
            speedup = row["fp32"]["ms_per_token"] / row["bf16"]["ms_per_token"]
            result[f"{w}@{position}"] = row | {"bf16_speedup": speedup}
            print(
                f"{position:8d} {w:<7} {row['fp32']['ms_per_token']:8.2f} "
                f"{row['fp32']['attention_ms']:7.2f} {row['bf16']['ms_per_token']:8.2f} "
                f"{row['bf16']['attention_ms']:7.2f} {speedup:6.2f}x"
            )
        del caches
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
