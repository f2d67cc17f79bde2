"""The compiled training loss with the unembedding over a padded vocabulary, side by side.

`gptkit train --compile` (one process) compiles the model and its loss as one graph, and
multiplies by the unembedding padded with zero rows to a multiple of 64
(`train.padded_logits`): gpt2's 50,257 rows become 50,304. The logits and the loss are
the same either way; this measures what the padding does to a training step's time.

Each multiple in `--multiples` trains in processes of its own, taking turns, `--procs`
processes each: on the 2-core dev CPU, two graphs compiled in one process timed apart by
5-25% either way depending on which was compiled first. A process compiles the loss as
`train.batch_loss` builds it for one model and one batch of random token ids, then times
`--steps` forward and backward passes (the optimizer's step is the same work either way
and left out). Prints each process's median ms per step, then the median over processes
of each multiple and its speed-up over the first.

    .venv/bin/python benchmarks/padded_vocab.py                      # CPU, ~5 minutes
    python benchmarks/padded_vocab.py --device cuda --full --batch 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from gptkit.config import GPTConfig
from gptkit.distributed import DistEnv
from gptkit.fileio import atomic_write_json
from gptkit.model import GPT
from gptkit.train import autocast, batch_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multiples", default="1,64", help="vocabulary multiples, first = baseline")
    p.add_argument("--procs", type=int, default=4, help="processes per multiple")
    p.add_argument("--full", action="store_true", help="the whole gpt2 preset (default: 4 x 128)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="default: 128, or 1024 with --full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.multiples = [int(m) for m in args.multiples.split(",") if m]
    return args


def model_config(args: argparse.Namespace) -> GPTConfig:
    size = {} if args.full else dict(n_layer=4, n_head=4, d_model=128)
    context = args.context or (1024 if args.full else 128)
    return GPTConfig.from_preset("gpt2", vocab_size=args.vocab, context_length=context, **size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args: argparse.Namespace, multiple: int) -> dict[str, float]:
    """In this process: compile the loss padded to `multiple`, time `args.steps` steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args)
    model = GPT(config).to(device)
    shape = (2, args.batch, config.context_length)
    x, y = torch.randint(0, config.vocab_size, shape, device=device)
    loss_of = batch_loss(model, True, device, DistEnv(), vocab_multiple=multiple)

    def step() -> float:
        with autocast(device, args.dtype):
            loss = loss_of(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    first = step()  # compiles
    step()
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return {"ms_per_step": statistics.median(times), "first_loss": first}


def run_child(argv: list[str], multiple: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", str(multiple)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(time_steps(args, args.child)))
        return {}
    config = model_config(args)
    print(
        f"gpt2 family, {config.n_layer} x {config.d_model}, vocab {config.vocab_size}, "
        f"batch {args.batch} x {config.context_length}, {args.dtype}, {args.device}, "
        f"{args.procs} processes x {args.steps} steps each, torch {torch.__version__}"
    )
    runs: dict[int, list[dict[str, float]]] = {m: [] for m in args.multiples}
    for _ in range(args.procs):
        for m in args.multiples:
            runs[m].append(run_child(argv, m))
            print(f"  multiple {m:>3}: {runs[m][-1]['ms_per_step']:8.1f} ms/step", flush=True)
    base = statistics.median(r["ms_per_step"] for r in runs[args.multiples[0]])
    rows = {}
    for m in args.multiples:
        ms = statistics.median(r["ms_per_step"] for r in runs[m])
        padded = -(-config.vocab_size // m) * m
        firsts = sorted({r["first_loss"] for r in runs[m]})
        rows[m] = {
            "padded_vocab": padded,
            "ms_per_step": ms,
            "speedup": base / ms,
            "first_losses": firsts,
            "processes": runs[m],
        }
        print(
            f"multiple {m:>3} (vocab {padded}): {ms:8.1f} ms/step (median of {args.procs}), "
            f"{base / ms:.3f}x, first loss {', '.join(f'{v:.6f}' for v in firsts)}"
        )
    result = {"config": config.to_dict(), "args": vars(args), "results": rows}
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
