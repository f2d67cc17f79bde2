"""Ablation: the spec's `seed` variant against GPT-2's, and each single change between them.

Every run trains the same size and budget with the character-Shakespeare recipe of
benchmarks/train_shakespeare.py (its MODEL and RECIPE constants: 4 layers, 4 heads, width
128, context 64, dropout 0, batch 12, AdamW lr 1e-3 cosine to 1e-4 after 100 warm-up
steps, 2,000 steps, seed 1337), through gptkit.train's own pieces (`build_model`,
`configure_optimizer`, `train_step`, `lr_at`, `estimate_val_loss`, `evaluate_full`), so the
only difference between runs is the model config:

- gpt2: learned positions, pre-LN + final LN, GELU, attention output projection;
- seed: sinusoidal positions, post-LN, leaky ReLU, no output projection, embeddings scaled
  by sqrt(d_model) (the `seed-tiny` preset's fields);
- gpt2 with one of those five changes applied, one run each;
- seed and gpt2 again on a BPE corpus (Shakespeare, `--tokenizer bpe --vocab-size 512`).

Prints a table (final loss on the whole validation split) and writes one PNG with every
validation-loss curve to benchmarks/out/ablation/ (git-ignored). Each finished run is saved
as results/<run>-<steps>.json there, so an interrupted benchmark keeps what it finished, a
rerun skips those runs (`--fresh` redoes them), and several processes can share the work
(`--only ...` each; `--report` then prints the table of everything finished).

    .venv/bin/python benchmarks/ablation.py
    .venv/bin/python benchmarks/ablation.py --steps 300 --only gpt2 seed
    .venv/bin/python benchmarks/ablation.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Waiting OpenMP threads spin otherwise, which on a shared machine costs 10x (see cli.main).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shakespeare import CORPUS, EVAL_BATCH, MODEL, RECIPE  # noqa: E402

from gptkit.config import PRESETS as MODEL_PRESETS  # noqa: E402
from gptkit.config import GPTConfig, TrainConfig  # noqa: E402
from gptkit.data import load_meta, open_split, prepare  # noqa: E402
from gptkit.distributed import DistEnv  # noqa: E402
from gptkit.fileio import atomic_write_json  # noqa: E402
from gptkit.train import (  # noqa: E402
    Run,
    batch_loss,
    build_model,
    configure_optimizer,
    estimate_val_loss,
    evaluate_full,
    lr_at,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
# The five fields in which the seed variant differs from gpt2 (config.py's _SEED).
SEED_FIELDS = ("norm", "positional", "activation", "attn_out_proj", "embed_scale")
# name -> (corpus, overrides of the gpt2 preset)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("char", {}),
    "seed": ("char", {f: MODEL_PRESETS["seed-tiny"][f] for f in SEED_FIELDS}),
    "gpt2 + post-LN": ("char", {"norm": "post"}),
    "gpt2 + sinusoidal": ("char", {"positional": "sinusoidal"}),
    "gpt2 + leaky ReLU": ("char", {"activation": "leaky_relu"}),
    "gpt2 - attn out-proj": ("char", {"attn_out_proj": False}),
    "gpt2 + embed scale": ("char", {"embed_scale": True}),
    "gpt2 (BPE 512)": ("bpe", {}),
    "seed (BPE 512)": ("bpe", {f: MODEL_PRESETS["seed-tiny"][f] for f in SEED_FIELDS}),
}
EVAL_EVERY = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already finished")
    parser.add_argument(
        "--report", action="store_true", help="train nothing: table and plot of finished runs"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "out" / "ablation"), help="work directory"
    )
    return parser.parse_args(argv)


def prepare_corpus(work: Path, kind: str) -> Path:
    """Shakespeare tokenized by characters or by a 512-token BPE, prepared once."""
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} not found: this benchmark needs the shared Shakespeare corpus")
    data = work / f"shakespeare_{kind}"
    if not (data / "meta.json").is_file():
        vocab = 512 if kind == "bpe" else None
        prepare([str(CORPUS)], str(data), tokenizer=kind, vocab_size=vocab, progress=False)
    return data


def train_variant(data: Path, overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """Train one model config from scratch; its val curve and whole-split val loss."""
    cfg = TrainConfig(
        data=str(data), preset="gpt2", **MODEL, **RECIPE, max_steps=steps, eval_every=EVAL_EVERY
    )
    meta = load_meta(data)
    config = GPTConfig.from_preset(
        "gpt2", vocab_size=meta["vocab_size"], **cfg.model_overrides(), **overrides
    )
    device = torch.device("cpu")
    model = build_model(config, cfg.seed, device)
    run = Run(
        cfg=cfg,
        run_dir=Path(os.devnull),  # nothing is saved: train_step and evaluation only
        device=device,
        model=model,
        forward=model,
        loss=batch_loss(model, cfg.compile, device, DistEnv()),
        optimizer=configure_optimizer(model, cfg, device),
        data_gen=torch.Generator().manual_seed(cfg.seed),
        train_tokens=open_split(data, "train"),
        val_tokens=open_split(data, "val"),
    )
    curve = [(0, estimate_val_loss(run))]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(run, lr_at(step, cfg))
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, estimate_val_loss(run)))
            elapsed = time.perf_counter() - start
            print(f"  step {step}: val {curve[-1][1]:.4f} ({elapsed:.0f} s)", file=sys.stderr)
    wall = time.perf_counter() - start
    val = evaluate_full(model, run.val_tokens, EVAL_BATCH, config.context_length)
    return {
        "corpus": data.name,
        "overrides": overrides,
        "params": config.num_parameters(),
        "curve": curve,
        "val_loss": val,
        "wall_s": wall,
        "load": os.getloadavg()[0],
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptkit.fileio import atomic_path

    corpora = sorted({r["corpus"] for r in results.values()})
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for name, r in results.items():
            if r["corpus"] != corpus:
                continue
            steps, losses = zip(*r["curve"][1:], strict=True)  # step 0 (~ln V) squashes the plot
            style = "-" if name.startswith(("gpt2", "seed")) and "+" not in name else "--"
            ax.plot(steps, losses, style, label=f"{name}: {r['val_loss']:.3f}")
        ax.set(title=corpus, xlabel="step", ylabel="val loss (20 fixed batches)")
        ax.grid(alpha=0.3)
        ax.legend(title="final loss, whole val split", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table(results: dict[str, dict[str, Any]], steps: int) -> str:
    lines = [
        f"| run ({steps} steps) | corpus | params | val loss (whole split) | vs gpt2 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        base = next(
            (
                b
                for n, b in results.items()
                if n.startswith("gpt2") and not b["overrides"] and b["corpus"] == r["corpus"]
            ),
            None,
        )
        delta = f"{r['val_loss'] - base['val_loss']:+.4f}" if base else "-"
        lines.append(
            f"| {name} | {r['corpus']} | {r['params']:,} | {r['val_loss']:.4f} | {delta} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def result_file(work: Path, name: str, steps: int) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return work / "results" / f"{slug}-{steps}.json"


def collect(work: Path, steps: int) -> dict[str, dict[str, Any]]:
    """The finished runs of `steps` steps, in RUNS order (several processes may add them)."""
    found = {}
    for name in RUNS:
        path = result_file(work, name, steps)
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    for name in [] if args.report else args.only or list(RUNS):
        path = result_file(work, name, args.steps)
        if path.is_file() and not args.fresh:
            print(f"skip (done, {path}): {name}", file=sys.stderr)
            continue
        corpus, overrides = RUNS[name]
        print(f"run: {name}", file=sys.stderr)
        result = train_variant(prepare_corpus(work, corpus), overrides, args.steps)
        print(
            f"done: {name}: val loss {result['val_loss']:.4f} in {result['wall_s']:.0f} s",
            file=sys.stderr,
        )
        atomic_write_json(path, result)
        plot(collect(work, args.steps), work / "ablation.png")
    results = collect(work, args.steps)
    if results:
        plot(results, work / "ablation.png")
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    print(f"\n{env}\n\n{table(results, args.steps)}\n\nplot: {work / 'ablation.png'}")


if __name__ == "__main__":
    main()
