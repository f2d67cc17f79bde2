"""The command line: help, one-line errors, and prepare -> train -> sample end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptkit.cli import COMMANDS, main

CORPUS = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind.\n" * 40


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits for -h and usage mistakes
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A char-level corpus prepared once for the module."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(CORPUS)
    assert (
        main(
            [
                "prepare",
                str(root / "corpus.txt"),
                "--out",
                str(root / "data"),
                "--tokenizer",
                "char",
            ]
        )
        == 0
    )
    return root / "data"


TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--d-model",
    "16",
    "--context-length",
    "16",
    "--batch-size",
    "4",
    "--eval-every",
    "5",
    "--eval-steps",
    "2",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def trained(prepared: Path) -> Path:
    run = prepared.parent / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared),
                "--out",
                str(run),
                *TINY,
                "--max-steps",
                "10",
                "--warmup-steps",
                "2",
            ]
        )
        == 0
    )
    return run


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(capsys, command: str | None) -> None:
    """Guards a command whose -h crashes or whose flags lost their help text."""
    code, out, _ = run_cli(capsys, *([command] if command else []), "-h")
    assert code == 0 and "usage: gptkit" in out
    if command == "train":
        assert "--max-steps" in out and "optimizer steps in total (default: 2000)" in out


def test_cli_defaults_are_the_function_defaults(capsys) -> None:
    """Guards the CLI and the Python function disagreeing about a default."""
    import inspect

    from gptkit.cli import build_parser

    args = build_parser().parse_args(["sample", "RUN"])
    for name, param in inspect.signature(COMMANDS["sample"]).parameters.items():
        if param.default is not inspect.Parameter.empty:
            assert getattr(args, name) == param.default, name


def test_console_script_runs() -> None:
    """Guards the installed `python -m gptkit` entry point."""
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "presets"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "gpt3-175b" in result.stdout, result.stderr


def test_usage_mistake_is_one_line(capsys) -> None:
    """Guards argparse's multi-line usage dump for a simple typo."""
    code, _, err = run_cli(capsys, "sample", "x", "--top-k", "many")
    assert_one_line_error(code, err, "--top-k")


def test_end_to_end(capsys, trained: Path) -> None:
    """Guards the whole path: prepare, train, then sample text from the run directory.

    (The run directory's exact file list is asserted in test_train.)
    """
    args = ["sample", trained, "--prompt", "To be", "--seed", "1", "--max-new-tokens", "30",
            "--num-samples", "2"]  # fmt: skip
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert out.count("To be") >= 2 and "sample 2" in out
    assert run_cli(capsys, *args)[1] == out  # same seed, same text


def test_sample_greedy_temperature_zero(capsys, trained: Path) -> None:
    """Guards `--temperature 0` being treated as 'unset' (the `x or default` bug)."""
    outs = {
        run_cli(
            capsys,
            "sample",
            trained,
            "--temperature",
            "0",
            "--seed",
            str(s),
            "--max-new-tokens",
            "20",
        )[1]
        for s in (1, 2)
    }
    assert len(outs) == 1


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--top-k", "0"], "top_k"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
    ],
)
def test_invalid_sampling_values(capsys, trained: Path, flags: list[str], needle: str) -> None:
    """Guards nonsense sampling values reaching torch (or being silently clamped)."""
    code, _, err = run_cli(capsys, "sample", trained, *flags)
    assert_one_line_error(code, err, needle)


def test_prepare_input_errors(capsys, tmp_path: Path) -> None:
    """Guards missing, empty, binary and non-UTF-8 inputs producing tracebacks or bad data."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary\x00" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    out = tmp_path / "data"
    cases = [
        ("nope.txt", "nope.txt"),
        ("empty.txt", "empty"),
        ("blob.bin", "blob.bin"),
        ("latin1.txt", "byte offset 3"),
    ]
    for name, needle in cases:
        code, _, err = run_cli(capsys, "prepare", tmp_path / name, "--out", out)
        assert_one_line_error(code, err, needle)
    assert not (out / "meta.json").exists()
    code, _, err = run_cli(
        capsys,
        "prepare",
        tmp_path / "latin1.txt",
        "--out",
        out,
        "--tokenizer",
        "char",
        "--errors",
        "replace",
    )
    assert code == 0, err


def test_train_errors(capsys, prepared: Path, trained: Path, tmp_path: Path) -> None:
    """Guards each training mistake: bad preset, no data, nothing to resume, tokenizer clash."""
    code, _, err = run_cli(
        capsys, "train", "--data", prepared, "--out", tmp_path / "r", "--preset", "gpt4"
    )
    assert_one_line_error(code, err, "gpt4", "seed-tiny")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nodata", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "nodata")
    code, _, err = run_cli(
        capsys, "train", "--data", prepared, "--out", tmp_path / "empty", "--resume"
    )
    assert_one_line_error(code, err, "resume")
    # a run trained on char data, resumed on data from another tokenizer
    (tmp_path / "c.txt").write_text(CORPUS)
    other = tmp_path / "bpe"
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "c.txt"),
                "--out",
                str(other),
                "--tokenizer",
                "bpe",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    code, _, err = run_cli(
        capsys, "train", "--data", other, "--out", trained, *TINY, "--max-steps", "20", "--resume"
    )
    assert_one_line_error(code, err, "tokenizer")
    # a context longer than the model's
    code, _, err = run_cli(
        capsys,
        "train",
        "--data",
        prepared,
        "--out",
        trained,
        *TINY[:6],
        "--context-length",
        "64",
        "--max-steps",
        "20",
        "--resume",
    )
    assert_one_line_error(code, err, "context")


def test_checkpoint_errors(capsys, trained: Path, tmp_path: Path) -> None:
    """Guards a missing or corrupt checkpoint surfacing as a traceback."""
    code, _, err = run_cli(capsys, "sample", tmp_path / "missing")
    assert_one_line_error(code, err, "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((trained / name).read_bytes())
    (broken / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:100])
    code, _, err = run_cli(capsys, "sample", broken)
    assert_one_line_error(code, err, "model.safetensors")
    (broken / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "sample", broken)
    assert_one_line_error(code, err, "config.json")


def test_metrics_lines(trained: Path) -> None:
    """Guards metrics.jsonl missing the keys the plots and users read."""
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train_loss" in x]
    assert len(train_lines) == 10
    assert {"step", "train_loss", "lr", "tokens_per_sec"} <= set(train_lines[0])
    assert any("val_loss" in x for x in lines)


def test_unwritable_outputs_are_one_line(capsys, prepared: Path, tmp_path: Path) -> None:
    """Guards NotADirectoryError tracebacks for an --out below a regular file (the same
    path as a read-only file system or a full disk; a file blocks root too)."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS)
    code, _, err = run_cli(capsys, "prepare", corpus, "--out", blocker / "sub")
    assert_one_line_error(code, err, "cannot write", "Not a directory")
    code, _, err = run_cli(
        capsys, "train", "--data", prepared, "--out", blocker / "run", *TINY, "--max-steps", "1"
    )
    assert_one_line_error(code, err, "cannot write", "afile")


def test_train_data_that_is_a_file(capsys, tmp_path: Path) -> None:
    """Guards `train --data small.txt` saying the data directory "does not exist"."""
    (tmp_path / "small.txt").write_text(CORPUS)
    code, _, err = run_cli(
        capsys, "train", "--data", tmp_path / "small.txt", "--out", tmp_path / "r"
    )
    assert_one_line_error(code, err, "small.txt is a file", "gptkit prepare")


@pytest.mark.parametrize("command", ["sample", "eval", "explain", "serve"])
@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_unusable_device_is_one_line(capsys, trained: Path, command: str, device: str) -> None:
    """Guards `--device cuda` without CUDA (AssertionError: Torch not compiled with CUDA
    enabled) and `--device tpu` (RuntimeError) as tracebacks; train already checked it."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra = {"eval": [trained / "config.json"], "explain": ["--prompt", "To be"]}
    code, _, err = run_cli(capsys, command, trained, *extra.get(command, []), "--device", device)
    assert_one_line_error(code, err, repr(device))


@pytest.mark.parametrize("seed", [str(2**64), "99999999999999999999999", str(-(2**63) - 1)])
def test_sample_seed_out_of_range(capsys, trained: Path, seed: str) -> None:
    """Guards a ValueError traceback ("Overflow when unpacking long long") from manual_seed."""
    code, out, err = run_cli(capsys, "sample", trained, "--seed", seed)
    assert_one_line_error(code, err, "--seed")
    assert out == ""


def test_sample_unknown_character_prints_nothing(capsys, trained: Path) -> None:
    """Guards the prompt reaching stdout before the error for a character a char model
    lacks: a pipe would get text and a failure."""
    code, out, err = run_cli(capsys, "sample", trained, "--prompt", "héllo")
    assert_one_line_error(code, err, "'é'")
    assert out == ""
