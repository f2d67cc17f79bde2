"""The training loss alone on a GPU: inductor's cross-entropy against gptkit.gpu_kernels'.

The logits of gpt2 at batch 64 x 1024 (65,536 rows of the vocabulary padded from 50,257
to 50,304 columns, bf16, as `gptkit train --compile` makes them) and random targets; each
way computes the mean loss over the first 50,257 columns and its gradient with respect to
the logits (bf16), forward + backward:

- inductor: `torch.compile` of `F.cross_entropy(logits[:, :50257].float(), targets)`,
  what the compiled training graph runs after the unembedding;
- triton: `gpu_kernels.cross_entropy` for a few block sizes and warp counts (the first
  is the module's default).

Reports ms per forward + backward, the bytes the least such loss moves (the logits read
twice, their gradient written once) over that time as GB/s, and how far each way's loss
and gradient are from an fp32 eager reference. Each way runs in turn for several rounds
on the same inputs; medians.

    python benchmarks/cross_entropy.py            # on a GPU, ~half a minute
    python benchmarks/cross_entropy.py --tiny     # a dry run on CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before triton is imported: kernels in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gptkit import gpu_kernels  # noqa: E402

CONFIGS = [(gpu_kernels.BLOCK, gpu_kernels.NUM_WARPS), (2048, 4), (8192, 8), (8192, 16)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small logits on CPU (a dry run)")
    p.add_argument("--rows", type=int, default=None, help="default 65,536 (64 x 1024)")
    p.add_argument("--vocab", type=int, default=None, help="default 50,257 (--tiny: 5,000)")
    p.add_argument("--multiple", type=int, default=64, help="pad the columns to this")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    rows = args.rows or (64 if args.tiny else 64 * 1024)
    vocab = args.vocab if args.vocab is not None else (5000 if args.tiny else 50257)
    width = vocab + -vocab % args.multiple
    rounds = args.rounds or (2 if args.tiny else 5)
    repeats = 1 if args.tiny else 10
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(rows, width, generator=g) * 4).to(device, torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)

    reference = logits[:, :vocab].float().requires_grad_()
    ref_loss = F.cross_entropy(reference, targets)
    ref_loss.backward()
    ref_grad = reference.grad
    del reference

    inductor = torch.compile(lambda x, t: F.cross_entropy(x[:, :vocab].float(), t))

    def inductor_step() -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.detach().requires_grad_()
        loss = inductor(x, targets)
        loss.backward()
        return loss.detach(), x.grad

    def triton_step(block: int, warps: int):
        def step() -> tuple[torch.Tensor, torch.Tensor]:
            gpu_kernels.BLOCK, gpu_kernels.NUM_WARPS = block, warps
            x = logits.detach().requires_grad_()
            loss = gpu_kernels.cross_entropy(x, targets, vocab)
            loss.backward()
            return loss.detach(), x.grad

        return step

    ways = {"inductor": inductor_step}
    ways.update({f"triton block {b} warps {w}": triton_step(b, w) for b, w in CONFIGS})
    results: dict[str, Any] = {}
    for name, step in ways.items():  # warm-up (compilation), and the error against fp32
        loss, grad = step()
        sync(device)
        results[name] = {
            "loss_error": abs(loss.item() - ref_loss.item()),
            "grad_max_error": float((grad[:, :vocab].float() - ref_grad).abs().max()),
            "padding_grad_zero": bool((grad[:, vocab:] == 0).all()),
            "ms": [],
        }
    for _ in range(rounds):
        for name, step in ways.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            sync(device)
            results[name]["ms"].append(1000 * (time.perf_counter() - start) / repeats)
    gpu_kernels.BLOCK, gpu_kernels.NUM_WARPS = CONFIGS[0]
    moved = 3 * rows * width * logits.element_size()  # read twice, gradient written once
    base = statistics.median(results["inductor"]["ms"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: logits {rows} x {width} bf16, vocab {vocab}")
    for way, r in results.items():
        r["median_ms"] = ms = statistics.median(r["ms"])
        r["gb_per_s"] = moved / ms / 1e6
        r["speedup"] = base / ms
        print(
            f"{way:28s} {ms:8.3f} ms  {r['gb_per_s']:7.0f} GB/s  {r['speedup']:5.2f}x  "
            f"loss err {r['loss_error']:.1e}, grad err {r['grad_max_error']:.1e}, "
            f"padding grad zero: {r['padding_grad_zero']}"
        )
    out = {"device": name, "rows": rows, "width": width, "vocab": vocab, "ways": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
