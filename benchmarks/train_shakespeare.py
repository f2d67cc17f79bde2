"""Character-level Shakespeare: gptkit's `train()` against a plain PyTorch loop.

The model is GPT-2-style (preset gpt2 with 4 layers, 4 heads, width 128, context 64,
dropout 0), trained with batch 12, AdamW lr 1e-3 (betas 0.9/0.999, weight decay 0.1 on
matrices, no gradient clipping), 100 warm-up steps then cosine to 1e-4 at 2,000 steps.
nanoGPT's `shakespeare_char` recipe uses betas 0.9/0.99 and clips at 1; at this size both
cost validation loss (4 seeds each, recorded in benchmarks/RESULTS.md). Reported:

- the final loss on the WHOLE validation split (last 10% of the characters);
- training tokens/s: the median over 50-step windows (robust to other processes taking the
  CPU for a while; the first window, which holds compilation, is left out), plus the
  end-to-end wall time;
- the same for a plain eager loop of the same model in the same process (nanoGPT-like:
  get_batch with torch.stack, forward, F.cross_entropy, backward, clip, AdamW) as the
  tokens/s baseline;
- the `seed` variant (spec: sinusoidal positions, post-LN, leaky ReLU, no attention output
  projection) at the same size;
- an interleaved speed test: gptkit's training step and the plain step timed in
  alternating 50-step chunks (`--rounds` of each), so that both see the same machine load.
  On a shared machine this ratio is the number to trust; the sequential runs' tokens/s
  can be minutes and several load levels apart.

    .venv/bin/python benchmarks/train_shakespeare.py
    .venv/bin/python benchmarks/train_shakespeare.py --variant gpt2 --steps 300 --no-compile
    .venv/bin/python benchmarks/train_shakespeare.py --skip-baseline --json out.json

Needs ../shared/data/tinyshakespeare.txt (relative to the repository root); prepared data
and runs go to benchmarks/out/ (git-ignored). The machine's load average is printed with
each run: on a shared 2-core machine other processes change the timings a lot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptkit.checkpoint import load_model
from gptkit.config import GPTConfig, TrainConfig
from gptkit.data import load_meta, open_split, prepare
from gptkit.fileio import atomic_write_json
from gptkit.model import GPT
from gptkit.train import evaluate_full, lr_at, setup, train, train_step

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=64, dropout=0.0)
PRESETS = {"gpt2": "gpt2", "seed": "seed-tiny"}
RECIPE = dict(
    batch_size=12,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.999,  # PyTorch's default; nanoGPT's 0.99 gave 0.01-0.03 higher val loss here
    grad_clip=0.0,  # clipping at 1 slowed learning at this size (val 1.887-1.902 vs 1.884-1.888)
    seed=1337,
)
WINDOW = 50  # steps per throughput window
EVAL_BATCH = 64  # sequences per batch for the whole-split evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument(
        "--variant", choices=["gpt2", "seed", "all"], default="all", help="model families to train"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="skip the plain loop")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train gptkit's runs with --compile (default: on)",
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="interleaved speed rounds (0 skips them)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="work directory")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be >= {2 * WINDOW} (two throughput windows)")
    return args


def prepare_data(work: Path) -> Path:
    """The character-tokenized corpus, prepared once into work/shakespeare_char."""
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} not found: this benchmark needs the shared Shakespeare corpus")
    data = work / "shakespeare_char"
    if not (data / "meta.json").is_file():
        prepare([str(CORPUS)], str(data), tokenizer="char", val_fraction=0.1, progress=False)
    return data


def run_gptkit(data: Path, work: Path, variant: str, steps: int, compile: bool) -> dict[str, Any]:
    """gptkit's train() from scratch; returns its timings and whole-split val loss."""
    out = work / f"run-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        preset=PRESETS[variant],
        **MODEL,
        **RECIPE,
        max_steps=steps,
        eval_every=250,
        eval_steps=20,
        save_every=0,
        log_every=WINDOW,
        compile=compile,
    )
    load = os.getloadavg()[0]
    start = time.perf_counter()
    train(cfg, progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
    model = load_model(out)
    return {
        "run": f"gptkit train ({variant}{', compile' if compile else ''})",
        "variant": variant,
        "val_loss": evaluate_full(model, open_split(data, "val"), EVAL_BATCH, 64),
        "tokens_per_sec": statistics.median(speeds),
        "wall_s": wall,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def plain_lr(it: int, steps: int) -> float:
    """nanoGPT's get_lr: linear warm-up, cosine decay to min_lr."""
    warmup, lr, min_lr = RECIPE["warmup_steps"], RECIPE["lr"], RECIPE["min_lr"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class PlainBlock(nn.Module):
    """nanoGPT's block in plain PyTorch: pre-LN, fused q|k|v, scaled_dot_product_attention,
    tanh-GELU MLP. GPT-2's parameter names, so gptkit's initial weights load into it."""

    def __init__(self, C: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(C, 3 * C), "c_proj": nn.Linear(C, C)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(C, 4 * C), "c_proj": nn.Linear(4 * C, C)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.attn["c_attn"](self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.attn["c_proj"](y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """The baseline's model: GPT-2 as nanoGPT writes it, nothing of gptkit's own kernels."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        C, T = MODEL["d_model"], MODEL["context_length"]
        self.wte, self.wpe = nn.Embedding(vocab_size, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(PlainBlock(C, MODEL["n_head"]) for _ in range(MODEL["n_layer"]))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied unembedding

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class PlainLoop:
    """A straightforward nanoGPT-like eager loop of the gpt2 variant: the baseline. Its
    model starts from the same weights as gptkit's (gptkit's initialisation, same seed)."""

    def __init__(self, data: Path, steps: int) -> None:
        meta = load_meta(data)
        self.data, self.steps = data, steps
        self.B, self.T = RECIPE["batch_size"], MODEL["context_length"]
        self.dtype = np.uint16 if meta["dtype"] == "uint16" else np.uint32
        torch.manual_seed(RECIPE["seed"])
        init = GPT(GPTConfig.from_preset("gpt2", vocab_size=meta["vocab_size"], **MODEL))
        self.model = PlainGPT(meta["vocab_size"])
        self.model.load_state_dict(init.state_dict())
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": RECIPE["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=RECIPE["lr"],
            betas=(RECIPE["beta1"], RECIPE["beta2"]),
        )

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.memmap(self.data / "train.bin", dtype=self.dtype, mode="r")
        T = self.T
        ix = torch.randint(len(tokens) - T, (self.B,))
        x = torch.stack([torch.from_numpy(tokens[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def step(self, it: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = plain_lr(it, self.steps)
        x, y = self.get_batch()
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        if RECIPE["grad_clip"] > 0:  # the same work as gptkit's step, which skips 0
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), RECIPE["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if it % 10 == 0:
            loss.item()  # nanoGPT reads the loss every log interval


class Products:
    """The training step's matrix products alone, as a floor under any step.

    For every nn.Linear of the plain model (the same shapes as gptkit's model: 17 linears,
    the tied unembedding included) the forward product (`addmm` with a bias, `mm` without)
    and the two products of its backward pass (input gradient dy W, weight gradient dy^T x)
    in the order autograd runs them, on operands allocated once. Both loops hand these to
    the same BLAS (MKL), so no rewrite of the rest of a step gets it below this time:
    tokens / this time bounds tokens/s, and the plain step / this time bounds the ratio.
    """

    def __init__(self, model: nn.Module, rows: int) -> None:
        self.linears = [
            (
                m.weight.detach(),
                None if m.bias is None else m.bias.detach(),
                torch.randn(rows, m.in_features),
                torch.randn(rows, m.out_features),
            )
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]

    def step(self, it: int) -> None:
        for w, b, x, _ in self.linears:
            torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
        for w, _, x, dy in reversed(self.linears):
            torch.mm(dy, w)  # input gradient
            torch.mm(dy.t(), x)  # weight gradient, in W's (out, in) layout as autograd makes it


def run_plain(data: Path, steps: int) -> dict[str, Any]:
    """The baseline trained from scratch: timings and whole-split val loss."""
    loop = PlainLoop(data, steps)
    load = os.getloadavg()[0]
    start = window_start = time.perf_counter()
    speeds = []
    for it in range(steps):
        loop.step(it)
        if (it + 1) % WINDOW == 0:
            now = time.perf_counter()
            speeds.append(WINDOW * loop.B * loop.T / (now - window_start))
            window_start = now
    wall = time.perf_counter() - start
    return {
        "run": "plain PyTorch loop (gpt2, eager)",
        "variant": "gpt2",
        "val_loss": evaluate_full(loop.model, open_split(data, "val"), EVAL_BATCH, loop.T),
        "tokens_per_sec": statistics.median(speeds[1:]),
        "wall_s": wall,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def interleaved_speed(data: Path, work: Path, compile: bool, rounds: int) -> dict[str, Any]:
    """tokens/s of gptkit's step and the plain step, timed in alternating 50-step chunks,
    with the steps' matrix products alone (`Products`) as a third side.

    Sequential runs minutes apart see different machine load; alternating chunks share it,
    so the median per-round ratio is the fairer comparison on a shared machine.
    """
    out = work / "run-speed"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        data=str(data), out=str(out), preset="gpt2", **MODEL, **RECIPE, compile=compile
    )
    run, plain = setup(cfg), PlainLoop(data, cfg.max_steps)
    ours = {"step": lambda it: train_step(run, lr_at(it + 1, cfg)), "times": []}
    base = {"step": plain.step, "times": []}
    floor = {"step": Products(plain.model, plain.B * plain.T).step, "times": []}
    sides = (ours, base, floor)
    for side in sides:  # warm-up (compilation, allocator)
        for it in range(20):
            side["step"](it)
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            for it in range(WINDOW):
                side["step"](20 + r * WINDOW + it)
            side["times"].append(time.perf_counter() - start)
    tokens = WINDOW * plain.B * plain.T
    ratios = [b / o for o, b in zip(ours["times"], base["times"], strict=True)]
    ceilings = [b / f for f, b in zip(floor["times"], base["times"], strict=True)]
    return {
        "gptkit_tokens_per_sec": tokens / statistics.median(ours["times"]),
        "plain_tokens_per_sec": tokens / statistics.median(base["times"]),
        "products_tokens_per_sec": tokens / statistics.median(floor["times"]),
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "median_ratio_ceiling": statistics.median(ceilings),
        "products_share": statistics.median(
            f / o for f, o in zip(floor["times"], ours["times"], strict=True)
        ),
        "compile": compile,
    }


def table(results: list[dict[str, Any]], steps: int) -> str:
    base = next((r for r in results if r["run"].startswith("plain")), None)
    lines = [
        f"| run ({steps} steps) | val loss (whole split) | tokens/s (median) | vs plain "
        "| ms/step | wall s | load avg before/after |",
        "|---|---|---|---|---|---|---|",
    ]
    tokens_per_step = RECIPE["batch_size"] * MODEL["context_length"]
    for r in results:
        ratio = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
        lines.append(
            f"| {r['run']} | {r['val_loss']:.4f} | {r['tokens_per_sec']:,.0f} | {ratio} "
            f"| {1000 * tokens_per_step / r['tokens_per_sec']:.1f} | {r['wall_s']:.0f} "
            f"| {r['load_before']:.1f} / {r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    variants = ["gpt2", "seed"] if args.variant == "all" else [args.variant]
    results = []
    for variant in variants:
        results.append(run_gptkit(data, work, variant, args.steps, args.compile))
        print(f"done: {results[-1]['run']}", file=sys.stderr)
        if variant == "gpt2" and not args.skip_baseline:
            results.append(run_plain(data, args.steps))
            print(f"done: {results[-1]['run']}", file=sys.stderr)
    speed = None
    if not args.skip_baseline and args.rounds > 0:
        speed = interleaved_speed(data, work, args.compile, args.rounds)
    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, {platform.machine()}"
    )
    print(f"\n{env}\n\n{table(results, args.steps)}")
    if speed is not None:
        print(
            f"\ninterleaved {WINDOW}-step chunks, {args.rounds} rounds: gptkit "
            f"{speed['gptkit_tokens_per_sec']:,.0f} tok/s, plain "
            f"{speed['plain_tokens_per_sec']:,.0f} tok/s, median ratio "
            f"{speed['median_ratio']:.2f}x (per round: "
            f"{', '.join(f'{r:.2f}' for r in speed['ratios'])})"
        )
        print(
            f"the steps' matrix products alone: {speed['products_tokens_per_sec']:,.0f} tok/s "
            f"({speed['products_share']:.0%} of gptkit's step), so the plain loop's step over "
            f"them, the most any step with these products could gain: "
            f"{speed['median_ratio_ceiling']:.2f}x"
        )
    if args.json:
        atomic_write_json(
            args.json, {"steps": args.steps, "env": env, "results": results, "interleaved": speed}
        )


if __name__ == "__main__":
    main()
