"""`gptkit demo`: its default corpus and one short run on the user's own text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, run_cli

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
    out, err = capsys.readouterr()
    assert "sample" in out and (run / "model.safetensors").exists()
    # 12 s minus the 30 s kept for sampling once said "for -0.3 minutes"; 10 s is the floor.
    assert "seed-family GPT for 10 seconds" in err
    # The schedule is sized to the budget (timed steps), not left at a huge max_steps that
    # the time limit cuts off before the learning rate ever decays.
    train_cfg = json.loads((run / "train_config.json").read_text())
    assert 20 <= train_cfg["max_steps"] < 10_000
    assert train_cfg["warmup_steps"] <= train_cfg["max_steps"] // 10
    # A second demo run samples the existing model instead of retraining it.
    assert main(["demo", "--data", str(corpus), "--out", str(run), "--minutes", "0.2"]) == 0
    assert "already holds a trained demo model" in capsys.readouterr().err


@pytest.mark.parametrize("minutes", ["nan", "inf", "0", "-1"])
def test_demo_minutes_must_be_finite_and_positive(capsys, tmp_path: Path, minutes: str) -> None:
    """Guards --minutes nan / inf passing the check and failing with a traceback after the
    data was prepared."""
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "run", "--minutes", minutes)
    assert_one_line_error(code, err, "--minutes")
    assert not (tmp_path / "run" / "data").exists()


def test_demo_on_too_little_text_gives_demo_advice(capsys, tmp_path: Path) -> None:
    """Guards the trainer's advice "use a shorter --context-length", a flag demo lacks."""
    corpus = tmp_path / "short.txt"
    corpus.write_text("hello world\n" * 100)
    code, _, err = run_cli(capsys, "demo", "--data", corpus, "--out", tmp_path / "run")
    error = [line for line in err.splitlines() if line.startswith("gptkit: error:")]
    assert code == 2 and len(error) == 1 and "Traceback" not in err, err
    assert "too few for the demo" in error[0] and "--data more text" in error[0]
    assert "--context-length" not in err


def test_demo_out_that_cannot_be_a_directory(capsys, tmp_path: Path) -> None:
    """Guards a traceback for `--out afile`, found only after preparing the data."""
    (tmp_path / "afile").write_text("not a directory")
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the cat sat on the mat.\n" * 10)
    code, _, err = run_cli(capsys, "demo", "--data", corpus, "--out", tmp_path / "afile")
    assert_one_line_error(code, err, "cannot write", "afile")


def test_demo_help_says_data_is_one_path(capsys) -> None:
    """Guards -h promising several --data inputs ("files, directories, globs") where the
    flag takes one."""
    code, out, _ = run_cli(capsys, "demo", "-h")
    assert code == 0 and "one file, directory or glob" in " ".join(out.split())  # wrapped
