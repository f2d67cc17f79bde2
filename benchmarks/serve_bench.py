"""Serving throughput: continuous batching against one-sequence-at-a-time, same run.

Starts `gptkit serve` twice on a random-weight model (gpt2-shaped, 4 layers, width 256,
char tokenizer, end-of-text made improbable) — once with --max-batch 32, once with
--max-batch 1 (batching off) — and drives each with 1, 8 and 32 concurrent streaming
clients. Every client asks for the same
seeded completion in both modes, so both sides generate the very same tokens. Reports
aggregate tokens/s and p50 / p99 time to first token (TTFT).

    python benchmarks/serve_bench.py [--max-tokens 64] [--clients 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from gptkit.checkpoint import save_model
from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n-"
PROMPT = "To be, or not to be: that is the question. "


def make_model(directory: Path, n_layer: int, d_model: int, context: int) -> None:
    tok = CharTokenizer.from_texts([TEXT])
    config = GPTConfig.from_preset(
        "gpt2",
        vocab_size=tok.vocab_size,
        context_length=context,
        n_layer=n_layer,
        n_head=d_model // 64,
        d_model=d_model,
    )
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # make end-of-text improbable, so every client gets max_tokens
        u = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
        model.ln_f.bias.copy_(5 * u)
        model.wte.weight[tok.eot_id] = -3 * u
    save_model(directory, model)
    tok.save(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gptkit", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "1024"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_client(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int):
    """(time to first token, tokens) for one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "stream": True}
    body["temperature"] = 1.0
    t0 = time.perf_counter()
    ttft, text = None, ""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
    return ttft if ttft is not None else time.perf_counter() - t0, len(text)  # 1 char = 1 token


async def load(url: str, clients: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(c, url, i, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * p99,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-model"
        make_model(model_dir, args.n_layer, args.d_model, args.context)
        for label, max_batch in [("batched (max-batch 32)", 32), ("unbatched (max-batch 1)", 1)]:
            proc, url = start_server(model_dir, max_batch)
            try:
                asyncio.run(load(url, 1, 4))  # warm-up
                for n in args.clients:
                    r = asyncio.run(load(url, n, args.max_tokens))
                    rows.append((label, n, r))
                    print(
                        f"{label:<24} clients {n:>3}: {r['tokens']:>5} tokens in "
                        f"{r['wall_s']:6.2f} s = {r['tok_per_s']:7.1f} tok/s, TTFT p50 "
                        f"{r['ttft_p50_ms']:7.1f} ms, p99 {r['ttft_p99_ms']:7.1f} ms",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    by = {(label.split()[0], n): r for label, n, r in rows}
    for n in args.clients:
        speedup = by[("batched", n)]["tok_per_s"] / by[("unbatched", n)]["tok_per_s"]
        print(f"clients {n:>3}: batched / unbatched throughput = {speedup:.2f}x")


if __name__ == "__main__":
    main()
