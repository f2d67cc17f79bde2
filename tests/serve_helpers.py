"""Helpers for the server tests: a tiny random model on disk and a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from conftest import tiny_config

from gptkit.checkpoint import load, save_model
from gptkit.model import GPT
from gptkit.serve import create_app
from gptkit.tokenizer import CharTokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.!?\n"


def make_model_dir(directory: Path, context_length: int = 128, seed: int = 0) -> Path:
    """A random tiny gpt2-family model with a char tokenizer, saved as a model directory."""
    tok = CharTokenizer.from_texts([ALPHABET])
    torch.manual_seed(seed)
    model = GPT(tiny_config("gpt2", vocab_size=tok.vocab_size, context_length=context_length))
    with torch.no_grad():  # sharper than the N(0, 0.02) init, so samples are not uniform noise
        model.wte.weight.mul_(3)
    save_model(directory, model)
    tok.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir: Path, **app_options) -> Iterator[str]:
    """Serve `model_dir` with uvicorn in a thread on a free loopback port; yield its URL."""
    model, tokenizer = load(model_dir)
    app = create_app(model, tokenizer, model_dir.name, **app_options)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric(url: str, name: str) -> float:
    """One sample from /metrics by its exact name and labels, e.g. 'x_bucket{le="1"}'."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
