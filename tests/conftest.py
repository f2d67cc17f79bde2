"""Shared test helpers: tiny configs and the optional Shakespeare corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gptkit.config import GPTConfig

# Without a GPU, gptkit.gpu_kernels' Triton kernels run in Triton's interpreter on CPU
# tensors (tests/test_gpu_kernels.py); triton reads the switch when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def tiny_config(family: str = "seed", **overrides) -> GPTConfig:
    """A model small enough for a unit test, from the `seed` or the `gpt2` family."""
    preset = "seed-tiny" if family == "seed" else "gpt2"
    base = dict(vocab_size=61, context_length=32, n_layer=2, n_head=4, d_model=32)
    return GPTConfig.from_preset(preset, **{**base, **overrides})


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP
    threads waiting for a descheduled partner made these tests 5-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
