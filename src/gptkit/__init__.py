"""gptkit: a GPT you can read, train on your own text, sample, serve and scale.

    >>> import gptkit
    >>> model, tokenizer = gptkit.load("runs/demo")
    >>> ids = torch.tensor([tokenizer.encode("def ")])
    >>> out = gptkit.generate(model, ids, max_new_tokens=50, top_k=40)

Names are imported lazily so that `import gptkit` (and `gptkit -h`) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPTConfig": "gptkit.config",
    "TrainConfig": "gptkit.config",
    "PRESETS": "gptkit.config",
    "GPT": "gptkit.model",
    "KVCache": "gptkit.model",
    "generate": "gptkit.generate",
    "load": "gptkit.hf",  # gptkit run and model directories, and Hugging Face GPT-2 ones
    "load_tokenizer": "gptkit.tokenizer",
    "GptkitError": "gptkit.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptkit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
