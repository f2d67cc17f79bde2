"""Sampling cost per token: gptkit's `sample_next` against the usual PyTorch recipe.

Picking the next token from 50,257 logits is not free on a CPU: with `gptkit sample`'s
defaults (temperature 0.8, top-k 200) the plain recipe took ~7 ms per token on the dev
machine, as long as an int8 gpt2 decode step. The plain recipe is what nanoGPT and
transformers' logits processors do: `torch.topk` for top-k (ties are not ordered by id),
a full sort for top-p, `torch.multinomial` for the draw, `torch.argmax` for greedy.
gptkit's (same semantics, ties by id, exact same filters): numpy's argmax; top-k on its
k survivors only; top-p ranks at most 1024 candidates when their mass settles it; an
inverse-CDF draw. Both run alternately in one process, `--repeats` rounds; the table
shows the median microseconds per call and the ratio.

    .venv/bin/python benchmarks/sampling.py [--repeats 7] [--calls 200] [--batch 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gptkit.generate import sample_next

V = 50257  # GPT-2's vocabulary


def plain_sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The common recipe (nanoGPT's top-k, transformers' top-p), for comparison."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


SETTINGS = {
    "greedy": dict(temperature=0.0, top_k=None, top_p=None),
    "temperature 1": dict(temperature=1.0, top_k=None, top_p=None),
    "T 0.8, top-k 200 (`gptkit sample`)": dict(temperature=0.8, top_k=200, top_p=None),
    "top-p 0.9, peaked logits": dict(temperature=1.0, top_k=None, top_p=0.9),
    "top-p 0.9, flat logits": dict(temperature=1.0, top_k=None, top_p=0.9, flat=True),
    "top-k 40 + top-p 0.95": dict(temperature=1.0, top_k=40, top_p=0.95),
}


def timed(fn: Callable[[], torch.Tensor], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--batch", type=int, default=1, help="rows of logits")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(args.batch, V, generator=g) * 8  # a trained model's spread
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"batch {args.batch}, vocabulary {V}, median of {args.repeats} x {args.calls} calls")
    print("\n| setting | plain us | gptkit us | speed-up |\n|---|---:|---:|---:|")
    with torch.inference_mode():
        for name, setting in SETTINGS.items():
            setting = dict(setting)
            logits = peaked / 20 if setting.pop("flat", False) else peaked
            sides = {
                "plain": lambda s=setting, x=logits: plain_sample(x, generator=g, **s),
                "gptkit": lambda s=setting, x=logits: sample_next(x, generator=g, **s),
            }
            times: dict[str, list[float]] = {side: [] for side in sides}
            for fn in sides.values():
                timed(fn, 5)  # warm-up
            for _ in range(args.repeats):
                for side, fn in sides.items():
                    times[side].append(timed(fn, args.calls))
            plain, ours = (statistics.median(times[side]) for side in sides)
            print(f"| {name} | {plain:,.0f} | {ours:,.0f} | {plain / ours:.1f}x |")


if __name__ == "__main__":
    main()
