"""Hugging Face GPT-2 directories: `gptkit convert` both ways, and HF dirs used directly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run_cli
from test_convert import _hf_model

from gptkit.checkpoint import load_model, save_model
from gptkit.generate import generate
from gptkit.hf import convert_dir, is_hf_dir, load
from gptkit.model import GPT
from gptkit.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")

# Different depths, head counts, widths, context lengths; vocabularies that are not
# multiples of 64 (1000, 333, 50001) and GPT-2's own 50,257 (which brings its tokenizer).
SHAPES = [
    dict(n_layer=1, n_head=2, n_embd=32, n_positions=24, vocab_size=1000),
    dict(n_layer=3, n_head=4, n_embd=48, n_positions=40, vocab_size=333, n_inner=72),
    dict(n_layer=2, n_head=3, n_embd=36, n_positions=16, vocab_size=50001),
    dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257),
]
FORMATS = ["safetensors", "bin"]


def save_hf(model, directory: Path, fmt: str = "safetensors") -> Path:
    """`save_pretrained`; for "bin", the weights as an older transformers saved them."""
    model.save_pretrained(directory)
    if fmt == "bin":  # transformers 5 writes only safetensors: pickle the state dict itself
        (directory / "model.safetensors").unlink()
        sd = model.state_dict()  # lm_head.weight included, as old checkpoints have it
        n = model.config.n_positions
        sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


def unit_scale(model):
    """Unit-scale matrices: greedy decoding then varies instead of repeating one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize(
    "shape, fmt",
    [(shape, FORMATS[i % 2]) for i, shape in enumerate(SHAPES)],  # each shape once, both formats
    ids=lambda x: f"V{x['vocab_size']}" if isinstance(x, dict) else x,
)
def test_imported_logits_match_hugging_face(tmp_path: Path, shape: dict, fmt: str) -> None:
    """Guards a directory import that loses or mangles weights (safetensors and .bin)."""
    hf = _hf_model(shape)
    src = save_hf(hf, tmp_path / "hf", fmt)
    convert_dir(src, tmp_path / "ours", "gptkit")
    ours = load_model(tmp_path / "ours")
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)
        direct, _ = (None, None) if shape["vocab_size"] != 50257 else load(src)
        if direct is not None:  # the HF directory used as it is: the same model
            assert torch.equal(direct(idx), ours(idx))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"V{s['vocab_size']}")
def test_export_import_export_is_bit_identical(tmp_path: Path, shape: dict) -> None:
    """Guards export altering weights, or an export that HF loads with missing/extra keys."""
    hf = _hf_model(shape)
    src = save_hf(hf, tmp_path / "hf")
    convert_dir(src, tmp_path / "ours", "gptkit")
    convert_dir(tmp_path / "ours", tmp_path / "hf1", "hf")
    convert_dir(tmp_path / "hf1", tmp_path / "ours2", "gptkit")
    convert_dir(tmp_path / "ours2", tmp_path / "hf2", "hf")
    original = load_file(src / "model.safetensors")
    first = load_file(tmp_path / "hf1" / "model.safetensors")
    second = load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys()
    for name, t in first.items():
        assert t.dtype == second[name].dtype and torch.equal(t, second[name]), name
        assert torch.equal(t, original[name]), name  # HF's own file, bit for bit
    back, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "hf2", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    idx = torch.randint(0, shape["vocab_size"], (2, 8))
    with torch.no_grad():
        assert torch.equal(back.eval()(idx).logits, hf(idx).logits)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s['vocab_size']}")
def test_greedy_generation_matches_hugging_face(tmp_path: Path, shape: dict) -> None:
    """Guards an imported model decoding differently from transformers' generate."""
    hf = unit_scale(_hf_model(shape))
    convert_dir(save_hf(hf, tmp_path / "hf"), tmp_path / "ours", "gptkit")
    ours = load_model(tmp_path / "ours")
    idx = torch.randint(0, shape["vocab_size"], (2, 4))
    n = shape["n_positions"] - 4
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
        min_new_tokens=n, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(generate(ours, idx, n, temperature=0), expected)
    assert len(set(expected[0, 4:].tolist())) >= 4  # not one repeated token


def test_sample_on_a_hugging_face_directory(capsys, tmp_path: Path) -> None:
    """Guards `gptkit sample` refusing HF directories or tokenizing them wrongly."""
    shape = SHAPES[3]
    hf = unit_scale(_hf_model(shape))
    src = save_hf(hf, tmp_path / "hf")
    assert is_hf_dir(src) and not is_hf_dir(tmp_path)
    tok = build_tokenizer("gpt2")
    prompt = "Hello world"
    code, out, err = run_cli(
        capsys, "sample", src, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6"
    )
    assert code == 0, err
    idx = torch.tensor([tok.encode(prompt)])
    expected = hf.generate(
        idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=6,
        min_new_tokens=6, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert out == tok.decode(expected[0].tolist()) + "\n"


def test_explain_on_a_hugging_face_directory(capsys, tmp_path: Path) -> None:
    """Guards `explain HF_DIR` failing with "unknown GPTConfig fields" while sample and
    eval take the same directory."""
    src = save_hf(_hf_model(SHAPES[3]), tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    code, out, err = run_cli(capsys, "explain", src, "--prompt", "Hello world", "--top-k", "3")
    assert code == 0, err
    assert "8. next token" in out


def test_cli_convert_both_ways_with_gpt2_tokenizer(capsys, tmp_path: Path) -> None:
    """Guards the CLI path and the tokenizer files: HF's GPT2TokenizerFast reads our export."""
    src = save_hf(_hf_model(SHAPES[3]), tmp_path / "hf")
    code, out, err = run_cli(capsys, "convert", src, tmp_path / "ours")
    assert code == 0 and "GPT-2" in out, err
    model, tok = load(tmp_path / "ours")
    assert tok.kind == "gpt2" and model.config.vocab_size == 50257
    code, out, err = run_cli(capsys, "convert", tmp_path / "ours", tmp_path / "out", "--to", "hf")
    assert code == 0, err
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "out")
    text = "naïve 東京 🙂 code(x)  \n\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == 50256 and config["model_type"] == "gpt2"


def test_bpe_tokenizer_travels_both_ways(tmp_path: Path) -> None:
    """Guards a gptkit model with its own BPE losing its tokenizer on the way through HF."""
    tok = build_tokenizer("bpe", ["hello world, hello there\n" * 20], vocab_size=280)
    model = GPT(tiny_config("gpt2", vocab_size=tok.vocab_size))
    save_model(tmp_path / "run", model)
    tok.save(tmp_path / "run")
    convert_dir(tmp_path / "run", tmp_path / "hf", "hf")
    hf_file = tmp_path / "hf" / "tokenizer.json"
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_file))
    assert hf_tok("hello world")["input_ids"] == tok.encode("hello world")
    convert_dir(tmp_path / "hf", tmp_path / "back", "gptkit")
    back_model, back_tok = load(tmp_path / "back")
    assert back_tok.kind == "bpe" and back_tok.encode("hello there") == tok.encode("hello there")
    idx = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(back_model(idx), model.eval()(idx))


def test_unknown_vocabulary_converts_without_tokenizer(capsys, tmp_path: Path) -> None:
    """Guards guessing a tokenizer for a vocabulary that is not GPT-2's (wrong text out)."""
    src = save_hf(_hf_model(SHAPES[0]), tmp_path / "hf")
    code, out, err = run_cli(capsys, "convert", src, tmp_path / "ours")
    assert code == 0 and "vocab_size is 1000" in out, err
    assert not (tmp_path / "ours" / "tokenizer.json").exists()
    load_model(tmp_path / "ours")  # the weights are usable from Python
    code, _, err = run_cli(capsys, "sample", src, "--max-new-tokens", "2")
    assert_one_line_error(code, err, "vocab_size is 1000")


def test_foreign_vocab_json_is_not_taken_for_gpt2(capsys, tmp_path: Path) -> None:
    """Guards pairing a 50,257-token model that has its own vocabulary with GPT-2's."""
    src = save_hf(_hf_model(SHAPES[3]), tmp_path / "hf")
    (src / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    code, out, err = run_cli(capsys, "convert", src, tmp_path / "ours")
    assert code == 0 and "not GPT-2's vocabulary" in out, err
    assert not (tmp_path / "ours" / "tokenizer.json").exists()


def test_seed_family_export_is_refused(capsys, tmp_path: Path) -> None:
    """Guards exporting a post-LN/sinusoidal model HF would run as a different network."""
    save_model(tmp_path / "seed", GPT(tiny_config("seed")))
    code, _, err = run_cli(capsys, "convert", tmp_path / "seed", tmp_path / "out", "--to", "hf")
    assert_one_line_error(code, err, "cannot export", "sinusoidal")
    assert not (tmp_path / "out").exists()


def _broken_dirs(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (HF directory with one problem, what the error must say)."""
    good = save_hf(_hf_model(SHAPES[0]), root / "good")
    cases = {}
    for name, edit, needle in [
        ("llama", {"model_type": "llama"}, "model_type 'llama'"),
        ("erf_gelu", {"activation_function": "gelu"}, "activation_function 'gelu'"),
        ("inverse_idx", {"scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx"),
    ]:
        d = root / name
        d.mkdir()
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        config = json.loads((good / "config.json").read_text()) | edit
        (d / "config.json").write_text(json.dumps(config))
        cases[name] = (d, needle)
    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    cases["no_weights"] = (no_weights, "no weights")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save({"w": torch.zeros(1), "code": Path("x")}, pickled / "pytorch_model.bin")
    cases["pickled"] = (pickled, "cannot read weights")
    cases["missing"] = (root / "nope", "not found")
    return cases


def test_conversion_errors_are_one_line(capsys, tmp_path: Path) -> None:
    """Guards tracebacks for unusable HF directories (and running pickled code on load)."""
    cases = _broken_dirs(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    for name, (src, needle) in cases.items():
        code, _, err = run_cli(capsys, "convert", src, tmp_path / f"out_{name}")
        assert_one_line_error(code, err, needle)
    ours = tmp_path / "ours"
    save_model(ours, GPT(tiny_config("gpt2")))
    code, _, err = run_cli(capsys, "convert", ours, tmp_path / "x")  # --to gptkit on ours
    assert_one_line_error(code, err, "not a Hugging Face model directory")
    code, _, err = run_cli(capsys, "convert", tmp_path / "good", tmp_path / "y", "--to", "hf")
    assert_one_line_error(code, err, "already a Hugging Face")
    code, _, err = run_cli(capsys, "convert", ours, ours, "--to", "hf")
    assert_one_line_error(code, err, "must differ")
    code, _, err = run_cli(capsys, "convert", tmp_path / "good", ours)
    assert_one_line_error(code, err, "already holds a model")


@pytest.mark.parametrize("held", ["tokenizer.json", "meta.json"])
def test_convert_refuses_a_prepared_data_directory(capsys, tmp_path: Path, held: str) -> None:
    """Guards `convert SRC DATA` silently replacing prepared data's tokenizer.json: the
    token files would then be trained with another vocabulary."""
    src = save_hf(_hf_model(SHAPES[3]), tmp_path / "hf")
    data = tmp_path / "data"
    data.mkdir()
    (data / held).write_text("prepared")
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run_cli(capsys, "convert", src, data)
    assert_one_line_error(code, err, "already holds", held)
    assert [p.name for p in data.iterdir()] == [held]
    assert (data / held).read_text() == "prepared"


def test_convert_to_an_unwritable_place_is_one_line(capsys, tmp_path: Path) -> None:
    """Guards a NotADirectoryError traceback for OUT below a regular file, both ways."""
    ours = tmp_path / "ours"
    save_model(ours, GPT(tiny_config("gpt2")))
    (tmp_path / "afile").write_text("not a directory")
    code, _, err = run_cli(capsys, "convert", ours, tmp_path / "afile" / "sub", "--to", "hf")
    assert_one_line_error(code, err, "cannot write", "afile")
    src = save_hf(_hf_model(SHAPES[0]), tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "afile" / "sub")
    assert_one_line_error(code, err, "cannot write", "afile")


def test_model_safetensors_gets_the_users_umask(tmp_path: Path) -> None:
    """Guards model.safetensors being 0600 when every other file follows the umask:
    safetensors' save_file recreates the temporary file instead of writing into it."""
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "run", GPT(tiny_config("gpt2")))
        convert_dir(tmp_path / "run", tmp_path / "hf", "hf")
    finally:
        os.umask(old)
    for file in (tmp_path / "run" / "model.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert file.stat().st_mode & 0o777 == 0o644, file


def test_sharded_safetensors_import(tmp_path: Path) -> None:
    """Guards refusing (or half-reading) what save_pretrained writes for models past 5 GB."""
    hf = _hf_model(SHAPES[1])
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_dir(tmp_path / "hf", tmp_path / "ours", "gptkit")
    idx = torch.randint(0, SHAPES[1]["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "ours")(idx), hf(idx).logits, atol=1e-4, rtol=0
        )
