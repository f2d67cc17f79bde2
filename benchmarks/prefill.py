"""Prompt processing on a CPU (time to first token): fp32, bf16 and int8 weights, one run.

A prompt's tokens go through the model together, so its products are matrix-matrix: at a
few rows they stream the weights like a decode step, at hundreds they are compute-bound.
For the `gpt2` preset (124M, random weights) and each of `--lengths`, a random prompt is
run through `GPT.next_logits` with a fresh KV cache (what `generate` does before its first
token) with each kind of weights; the kinds take turns, `--repeats` rounds; the table shows
the median milliseconds and each kind's time over fp32's (the JSON also holds each kind's
weight bytes per token).

    .venv/bin/python benchmarks/prefill.py
    .venv/bin/python benchmarks/prefill.py --lengths 16,512 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from gptkit.config import GPTConfig
from gptkit.fileio import atomic_write_json
from gptkit.model import GPT, KVCache
from gptkit.quantize import quantize_model, weight_bytes_per_token

WEIGHTS = ("fp32", "bf16", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16,64,128,512", help="prompt lengths in tokens")
    p.add_argument("--repeats", type=int, default=5, help="rounds (each kind once per round)")
    p.add_argument("--preset", default="gpt2", help="model preset (random weights)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    return args


def prefill_ms(model: GPT, ids: torch.Tensor) -> float:
    """Milliseconds to run the prompt ids (1, T) into a fresh cache and get the next logits."""
    cache = KVCache(model.config, 1, ids.shape[1] + 1)
    start = time.perf_counter()
    with torch.inference_mode():
        model.next_logits(ids, cache)
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset(args.preset)).eval()
    models = {w: quantize_model(copy.deepcopy(base), w) for w in WEIGHTS}
    del base
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    result["bytes_per_token"] = {w: weight_bytes_per_token(m) for w, m in models.items()}
    print(f"{'tokens':>6} " + " ".join(f"{w + ' ms':>9} {'x fp32':>7}" for w in WEIGHTS))
    for T in args.lengths:
        ids = torch.randint(0, models["fp32"].config.vocab_size, (1, T))
        for model in models.values():
            prefill_ms(model, ids)  # warm-up
        times: dict[str, list[float]] = {w: [] for w in WEIGHTS}
        for _ in range(args.repeats):
            for w, model in models.items():
                times[w].append(prefill_ms(model, ids))
        row = {w: statistics.median(times[w]) for w in WEIGHTS}
        result[str(T)] = {"ms": row, "rounds": times}
        print(f"{T:6d} " + " ".join(f"{row[w]:9.1f} {row[w] / row['fp32']:6.2f}x" for w in WEIGHTS))
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
