"""`gptkit demo`: its default corpus and one short run on the user's own text."""

from __future__ import annotations

import json
from pathlib import Path

from gptkit.cli import main
from gptkit.demo import demo_sources


def test_default_corpus_is_the_standard_library() -> None:
    """Guards the demo needing a download: its corpus is Python's own ordinary modules."""
    sources = demo_sources()
    names = {p.name for p in sources}
    assert {"os.py", "argparse.py"} <= names
    assert not any("test" in p.parts or "site-packages" in p.parts for p in sources)
    assert sum(p.stat().st_size for p in sources) > 5_000_000


def test_demo_on_user_text(tmp_path: Path, capsys) -> None:
    """Guards the demo's whole loop (prepare, train within the budget, sample) on --data."""
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 200)
    run = tmp_path / "run"
    assert main(["demo", "--data", str(corpus), "--out", str(run), "--minutes", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and (run / "model.safetensors").exists()
    # The schedule is sized to the budget (timed steps), not left at a huge max_steps that
    # the time limit cuts off before the learning rate ever decays.
    train_cfg = json.loads((run / "train_config.json").read_text())
    assert 20 <= train_cfg["max_steps"] < 10_000
    assert train_cfg["warmup_steps"] <= train_cfg["max_steps"] // 10
    # A second demo run samples the existing model instead of retraining it.
    assert main(["demo", "--data", str(corpus), "--out", str(run), "--minutes", "0.2"]) == 0
    assert "already holds a trained demo model" in capsys.readouterr().err
