"""Training metrics on disk: `metrics.jsonl` (one JSON object a line) and `loss.png`.

    >>> log = MetricsLog(Path("runs/demo/metrics.jsonl"), resume_step=None)
    >>> log.write({"step": 10, "train_loss": 3.1, "lr": 1e-4, "tokens_per_sec": 2e4})
    >>> log.close(); plot_losses(Path("runs/demo"))

Lines are appended and flushed one at a time, so a kill loses at most the line being
written; readers skip a torn last line. On resume the file is cut back to the
checkpoint's step, so it never holds two histories of the same steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from gptkit.fileio import atomic_write_bytes, atomic_write_with

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed line by line."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = read_metrics(path, max_step=resume_step) if resume_step is not None else []
        # Rewrite atomically without the lines of steps after the checkpoint (or all of
        # them for a fresh run) so the file tells one consistent story.
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self.file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, skipping a torn last line and steps after `max_step`."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and (max_step is None or record.get("step", 0) <= max_step):
            records.append(record)
    return records


def plot_losses(run_dir: Path) -> None:
    """loss.png: train and val loss against step, from metrics.jsonl (written atomically)."""
    from matplotlib.figure import Figure  # Agg canvas by default; no pyplot global state

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    atomic_write_with(Path(run_dir) / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png"))
