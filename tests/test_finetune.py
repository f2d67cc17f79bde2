"""Fine-tuning: `gptkit train --init-from MODEL` starts from a trained model's weights.

The source is a gptkit run or model directory, or a Hugging Face GPT-2 directory; its
shape and tokenizer come with it, and `gptkit prepare --tokenizer MODEL` encodes new text
with that tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_cli
from test_train import fake_data, tiny

from gptkit.checkpoint import load_model
from gptkit.config import TrainConfig
from gptkit.data import prepare
from gptkit.errors import GptkitError
from gptkit.rundir import resume_command
from gptkit.train import setup, train

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A trained run (gpt2 family, learned positions, context 16) on char data."""
    return train(tiny(fake_data(tmp_path / "src_data"), tmp_path / "src", max_steps=6), False)


def finetune(data: Path, out: Path, init_from: Path, **overrides) -> TrainConfig:
    """`tiny`'s options with the model taken from `init_from` (no preset, no shape)."""
    shape = dict(preset=None, n_layer=None, n_head=None, d_model=None, context_length=None)
    return tiny(data, out, init_from=str(init_from), **{**shape, **overrides})


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_starts_from_the_runs_weights_then_trains_and_resumes(source, tmp_path):
    data = fake_data(tmp_path / "new_data", seed=1)  # same vocabulary, other text
    cfg = finetune(data, tmp_path / "ft", source, max_steps=4, eval_every=2)
    start = setup(cfg)
    before = state(load_model(source))
    assert start.model.config == load_model(source).config
    after_setup = state(start.model)
    assert after_setup.keys() == before.keys()
    assert all(torch.equal(after_setup[k], before[k]) for k in before)

    run = train(cfg, progress=False)
    trained = state(load_model(run))
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # it did train
    # Resuming keeps the checkpoint's weights, not --init-from's, and leaves --init-from out.
    again = dataclasses.replace(cfg, max_steps=6, resume=True)
    resumed = setup(again)
    assert resumed.step == 4
    assert all(torch.equal(state(resumed.model)[k], trained[k]) for k in trained)
    assert "--init-from" not in resume_command(again)
    other = dataclasses.replace(again, init_from=str(tmp_path / "elsewhere"))
    with pytest.raises(GptkitError, match="differs from the run's .*drop --init-from"):
        setup(other)
    train(again, progress=False)
    assert load_model(run).config == start.model.config


def test_a_shorter_context_keeps_the_first_positions(source, tmp_path):
    data = fake_data(tmp_path / "new_data", seed=1)
    run = setup(finetune(data, tmp_path / "ft", source, context_length=8, dropout=0.1))
    original = load_model(source)
    assert run.model.config == dataclasses.replace(original.config, context_length=8, dropout=0.1)
    assert torch.equal(run.model.wpe.weight.detach(), original.wpe.weight.detach()[:8])
    idx = torch.randint(0, original.config.vocab_size, (2, 8))
    run.model.eval()
    with torch.no_grad():  # causal: a prefix's logits do not depend on what the context allows
        torch.testing.assert_close(run.model(idx), original(idx), rtol=0, atol=1e-6)


def test_starts_from_a_hugging_face_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_convert import _hf_model

    hf = _hf_model(dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(TEXT * 20)
    prepare([str(tmp_path / "text.txt")], str(tmp_path / "data"), "gpt2", progress=False)
    run = setup(finetune(tmp_path / "data", tmp_path / "ft", tmp_path / "hf", context_length=24))
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    ids = torch.randint(0, 50257, (2, 24))
    run.model.eval()
    with torch.no_grad():  # the weights gptkit starts from compute what transformers does
        torch.testing.assert_close(run.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(preset="gpt2"), "--preset cannot be combined with --init-from"),
        (dict(n_layer=2), "--n-layer cannot be combined with --init-from"),
        (dict(d_model=64), "--d-model cannot be combined"),
        (dict(context_length=17), "--context-length 17 exceeds the 16 positions"),
        (dict(dropout=1.5), "dropout must be in [0, 1)"),
    ],
)
def test_shape_options_are_refused(source, tmp_path, overrides, message):
    cfg = finetune(fake_data(tmp_path / "d", seed=1), tmp_path / "ft", source, **overrides)
    with pytest.raises(GptkitError) as e:
        setup(cfg)
    assert message in str(e.value)
    assert not (tmp_path / "ft" / "config.json").exists()  # refused before writing anything


def test_data_of_another_tokenizer_is_refused(source, tmp_path):
    other = fake_data(tmp_path / "d", vocab_size=30)  # other characters
    with pytest.raises(GptkitError) as e:
        setup(finetune(other, tmp_path / "ft", source))
    assert "prepared with another tokenizer" in str(e.value)
    assert f"--tokenizer {source}" in str(e.value)
    with pytest.raises(GptkitError, match="model directory not found"):
        setup(finetune(other, tmp_path / "ft", tmp_path / "nowhere"))


def test_cli_prepares_with_the_models_tokenizer_and_fine_tunes(capsys, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT * 30)
    (tmp_path / "b.txt").write_text(TEXT[::-1] * 30)  # the same characters, other text
    (tmp_path / "c.txt").write_text("To be ~\n")  # one character the run never saw
    a, b, c, base, ft = (str(tmp_path / n) for n in ("da", "db", "dc", "base", "ft"))
    assert run_cli(capsys, "prepare", tmp_path / "a.txt", "--out", a, "--tokenizer", "char")[0] == 0
    shape = ["--preset", "gpt2", "--n-layer", "1", "--n-head", "2", "--d-model", "32"]
    short = ["--context-length", "16", "--batch-size", "2", "--eval-every", "0", "--max-steps", "2"]
    code, _, err = run_cli(capsys, "train", "--data", a, "--out", base, *shape, *short)
    assert code == 0, err

    assert run_cli(capsys, "prepare", tmp_path / "b.txt", "--out", b, "--tokenizer", base)[0] == 0
    assert Path(b, "tokenizer.json").read_text() == Path(base, "tokenizer.json").read_text()
    code, _, err = run_cli(capsys, "prepare", tmp_path / "c.txt", "--out", c, "--tokenizer", base)
    assert_one_line_error(code, err, "c.txt", "'~' is not in this char tokenizer's vocabulary")

    code, _, err = run_cli(capsys, "train", "--data", b, "--out", ft, "--init-from", base, *short)
    assert code == 0, err
    assert load_model(ft).config == load_model(base).config
    again = ["train", "--data", b, "--out", ft + "2", "--init-from", base, "--n-head", "4"]
    code, _, err = run_cli(capsys, *again)
    assert_one_line_error(code, err, "--n-head cannot be combined with --init-from")
