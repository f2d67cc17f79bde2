"""Serving throughput: continuous batching against one-sequence-at-a-time, same run.

Starts `gptkit serve` twice on a random-weight model (gpt2-shaped, 4 layers, width 256,
char tokenizer, end-of-text made improbable) — once with --max-batch 32, once with
--max-batch 1 (batching off) — and drives each with 1, 8 and 32 concurrent streaming
clients. Every client asks for the same
seeded completion in both modes, so both sides generate the very same tokens. Reports
aggregate tokens/s and p50 / p99 time to first token (TTFT).

    python benchmarks/serve_bench.py [--max-tokens 64] [--clients 1 8 32]
    python benchmarks/serve_bench.py --clients 1 2 --max-tokens 4 --n-layer 1 --d-model 64
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
from typing import Any

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


async def one_client(url: str, seed: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens) for one streamed completion.

    A bare asyncio HTTP/1.1 client: 32 streams through httpx cost this 2-core machine more
    CPU than the batched server itself, and the load generator must not be the bottleneck.
    Each `data:` line is one server-sent event (JSON never holds a raw newline).
    """
    host, port = url.removeprefix("http://").split(":")
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "stream": True}
    payload = json.dumps({**body, "temperature": 1.0}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode() + payload)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}")
    ttft, text = None, ""
    while line := await reader.readline():
        if line.startswith(b"data: {"):
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
        elif line.startswith(b"data: [DONE]"):
            break
    writer.close()
    return ttft if ttft is not None else time.perf_counter() - t0, len(text)  # 1 char = 1 token


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, clients: int, max_tokens: int, pid: int) -> dict[str, float]:
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    results = await asyncio.gather(*(one_client(url, i, max_tokens) for i in range(clients)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * p99,
        "server_cpu_ms_per_token": 1000 * cpu / max(tokens, 1),
    }


def step_cpu_ms(
    model_dir: Path, batch_sizes: list[int], native: bool = True, steps: int = 20
) -> dict[int, float]:
    """CPU time (this thread, 1 torch thread) of one scheduler decode step per batch size.

    Thread CPU time hardly moves when other processes share the cores, unlike wall time.
    `native=False` keeps the steps on the eager blocks (`GPT.native_decode`), for comparison.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _step_cpu_ms(model_dir, batch_sizes, native, steps)
    finally:
        torch.set_num_threads(threads)  # the caller's thread count, as it was


def _step_cpu_ms(
    model_dir: Path, batch_sizes: list[int], native: bool, steps: int
) -> dict[int, float]:
    from gptkit.batching import SamplingParams, Scheduler, Sequence
    from gptkit.checkpoint import load

    model, tok = load(model_dir)
    model.native_decode = native
    prompt = tok.encode(PROMPT)
    out = {}
    for B in batch_sizes:
        sched = Scheduler(model, tok.eot_id, max(batch_sizes), 0)
        params = SamplingParams(steps + 1, temperature=1.0)
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        seqs = [Sequence(prompt, params, lambda e: None, g) for g in gens]
        with torch.inference_mode():
            for seq in seqs:
                sched._admit(seq)
            sched._decode_step()  # warm-up
            t0 = time.thread_time()
            for _ in range(steps - 1):
                sched._decode_step()
            out[B] = 1000 * (time.thread_time() - t0) / (steps - 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prints the tables; returns {"steps": {path: {B: ms}}, "load": {(mode, clients): load's
    dict}, "speedup": {clients: batched / unbatched tokens/s}} (no "load" with --steps-only)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps-only", action="store_true", help="only the in-process step CPU times")
    args = ap.parse_args(argv)
    rows = []
    result: dict[str, Any] = {"steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "bench-model"
        make_model(model_dir, args.n_layer, args.d_model, args.context)
        for native in (True, False):
            path = "native" if native else "eager blocks"
            result["steps"][path] = step_cpu_ms(model_dir, args.clients, native)
            for B, ms in result["steps"][path].items():
                print(
                    f"decode step ({path}), batch {B:>3}: {ms:6.2f} ms CPU "
                    f"= {ms / B:5.2f} ms CPU per token"
                )
        if args.steps_only:
            return result
        for label, max_batch in [("batched (max-batch 32)", 32), ("unbatched (max-batch 1)", 1)]:
            proc, url = start_server(model_dir, max_batch)
            try:
                asyncio.run(load(url, 1, 4, proc.pid))  # warm-up
                for n in args.clients:
                    r = asyncio.run(load(url, n, args.max_tokens, proc.pid))
                    rows.append((label, n, r))
                    print(
                        f"{label:<24} clients {n:>3}: {r['tokens']:>5} tokens in "
                        f"{r['wall_s']:6.2f} s = {r['tok_per_s']:7.1f} tok/s, TTFT p50 "
                        f"{r['ttft_p50_ms']:7.1f} ms, p99 {r['ttft_p99_ms']:7.1f} ms; server "
                        f"{r['server_cpu_ms_per_token']:5.2f} ms CPU/token",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    result["load"] = by = {(label.split()[0], n): r for label, n, r in rows}
    result["speedup"] = {}
    for n in args.clients:
        speedup = by[("batched", n)]["tok_per_s"] / by[("unbatched", n)]["tok_per_s"]
        result["speedup"][n] = speedup
        print(f"clients {n:>3}: batched / unbatched throughput = {speedup:.2f}x")
    return result


if __name__ == "__main__":
    main()
