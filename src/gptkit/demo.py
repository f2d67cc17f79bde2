"""`gptkit demo`: prepare a corpus, train a small spec-style GPT for a few minutes, sample it.

The default corpus is the Python standard library's own source, present wherever Python
runs, so a first run needs no download. `--data` trains on the user's text instead.

    >>> run_demo(data=None, out="runs/demo", minutes=5.0, seed=1337)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

# Test suites, IDLE and demos are skipped: they are large and unlike ordinary modules.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
# A seed-family model small enough to learn visibly in minutes on two CPU cores.
DEMO_MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=256)
_SAMPLE_TOKENS = 250  # within the context, so every step uses the KV cache
_SAMPLE_SECONDS = 30  # kept back from the budget for sampling
_MIN_TRAIN_SECONDS = 10.0  # trained at least this long, whatever --minutes leaves
_VAL_FRACTION = 0.05
_BATCH_SIZE = 8
_TIMED_STEPS = 6  # steps timed (after 2 untimed) to size the schedule to the budget


def demo_sources() -> list[Path]:
    """The standard library's ordinary modules (about 10 MB of Python)."""
    from gptkit.data import stdlib_sources

    return [p for p in stdlib_sources() if not _SKIP_DIRS & set(p.parts)]


def run_demo(data: str | None, out: str, minutes: float, seed: int) -> Path:
    from gptkit.config import TrainConfig
    from gptkit.data import prepare
    from gptkit.errors import GptkitError
    from gptkit.fileio import make_dir
    from gptkit.plan import duration_text
    from gptkit.train import train

    if not 0 < minutes < math.inf:  # also refuses nan, which fails every comparison
        raise GptkitError(f"--minutes must be a finite number > 0, got {minutes}")
    start = time.monotonic()
    run_dir, data_dir = make_dir(out), Path(out) / "data"  # unwritable: fail before preparing
    if (run_dir / "model.safetensors").exists():
        print(
            f"{run_dir} already holds a trained demo model: sampling it "
            f"(delete it, or pass --out elsewhere, to train again)",
            file=sys.stderr,
        )
    else:
        # 1. tokenize the corpus (characters: small vocabulary, nothing to download)
        inputs = [data] if data is not None else [str(p) for p in demo_sources()]
        print(f"preparing {len(inputs)} input(s) into {data_dir} ...", file=sys.stderr)
        errors = "replace" if data is None else "strict"  # a few stdlib files are not UTF-8
        progress = sys.stderr.isatty()
        prepare(inputs, str(data_dir), "char", None, _VAL_FRACTION, errors, progress=progress)
        _check_corpus_length(data_dir, data)
        # 2. train for what is left of the budget: time a few steps first, so that the
        # cosine schedule can decay to its floor just as the budget runs out
        budget = minutes * 60 - (time.monotonic() - start) - _SAMPLE_SECONDS
        budget = max(budget, _MIN_TRAIN_SECONDS)
        steps = _steps_within(budget, data_dir, batch_size=_BATCH_SIZE, seed=seed)
        print(
            f"training a {DEMO_MODEL['n_layer']}-layer seed-family GPT for "
            f"{duration_text(budget)} ...",
            file=sys.stderr,
        )
        cfg = TrainConfig(
            data=str(data_dir),
            out=str(run_dir),
            preset="seed-tiny",
            **DEMO_MODEL,
            batch_size=_BATCH_SIZE,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=min(100, steps // 10),
            max_steps=steps,
            max_time=budget,  # the safety stop if the machine slows down
            eval_every=500,
            eval_steps=10,
            save_every=1000,
            seed=seed,
            dropout=0.0,
        )
        train(cfg, progress=progress)
    # 3. show what it learned
    _print_samples(
        run_dir, prompts=["def ", "class ", "import "] if data is None else [""], seed=seed
    )
    return run_dir


def _check_corpus_length(data_dir: Path, data: str | None) -> None:
    """Both splits must hold a window of the demo's context; the demo has no flag to shorten it."""
    from gptkit.data import load_meta
    from gptkit.errors import GptkitError

    meta, window = load_meta(data_dir), DEMO_MODEL["context_length"] + 1
    if min(meta["train_tokens"], meta["val_tokens"]) < window:
        # The validation split is the smaller one: it needs `window` characters.
        need = math.ceil(window / _VAL_FRACTION)
        raise GptkitError(
            f"{data or 'the corpus'} has {meta['train_tokens'] + meta['val_tokens']:,} "
            f"characters, too few for the demo (about {need:,} are needed); give --data more text"
        )


def _steps_within(seconds: float, data_dir: Path, batch_size: int, seed: int) -> int:
    """How many training steps of the demo model fit in `seconds` on this machine.

    Times a few optimizer steps of a throwaway copy of the model on random tokens; 10%
    is kept back for evaluation and checkpoints. At least 20 steps.
    """
    import torch
    import torch.nn.functional as F

    from gptkit.config import GPTConfig
    from gptkit.data import load_meta
    from gptkit.model import GPT

    vocab = load_meta(data_dir)["vocab_size"]
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("seed-tiny", vocab_size=vocab, **DEMO_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch_size, DEMO_MODEL["context_length"]))

    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(_TIMED_STEPS):
        step()
    per_step = (time.perf_counter() - start) / _TIMED_STEPS
    return max(20, int(0.9 * seconds / per_step))


def _print_samples(run_dir: Path, prompts: list[str], seed: int) -> None:
    import torch

    from gptkit.checkpoint import load
    from gptkit.generate import stream_text

    model, tokenizer = load(run_dir)
    generator = torch.Generator().manual_seed(seed)
    for prompt in prompts:
        print(f"\n{'=' * 30} sample {'=' * 30}\n{prompt}", end="", flush=True)
        for piece in stream_text(
            model, tokenizer, prompt, _SAMPLE_TOKENS, 0.8, 40, None, generator
        ):
            print(piece, end="", flush=True)
        print()
    print(f"\nmore: gptkit sample {run_dir} --prompt 'def ' --max-new-tokens 500")
