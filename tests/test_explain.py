"""`gptkit explain`: the numbers it shows are the model's own, and its files are valid."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_cli import assert_one_line_error, run_cli

from gptkit.checkpoint import load, save_model
from gptkit.errors import GptkitError
from gptkit.explain import (
    explain,
    render_html,
    render_text,
    tables,
    top_tokens,
    write_report,
)
from gptkit.generate import sample_next, top_k_filter, top_p_filter
from gptkit.model import GPT, reference_attention
from gptkit.tokenizer import CharTokenizer

TEXT = "To be, or not to be, that is the question.\n"
PROMPT = "to be or not"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_tiny(directory: Path, family: str) -> Path:
    """A tiny random model (the gpt2 one with banded layers) and its tokenizer on disk."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_texts([TEXT])
    extra = dict(attention="alternating", attn_band=4) if family == "gpt2" else {}
    cfg = tiny_config(family, vocab_size=tok.vocab_size, context_length=16, **extra)
    save_model(directory, GPT(cfg))
    tok.save(directory)
    return directory


@pytest.fixture(scope="module", params=["gpt2", "seed"])
def model_dir(request, tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(f"explain-{request.param}"), request.param)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("explain-files"), "gpt2")


def test_numbers_are_the_models_own(model_dir: Path) -> None:
    """Guards explain showing numbers from a different computation than the model's forward."""
    model, tok = load(model_dir)
    ex = explain(model, tok, PROMPT, top_k=5, top_p=0.5)
    idx = torch.tensor([tok.encode(PROMPT)])
    logits = model(idx)[0, -1]
    probs = torch.softmax(logits.double(), dim=-1)
    # 8. the top-1 probability is softmax of the model's last logits
    assert ex.top[0]["id"] == int(probs.argmax())
    assert ex.top[0]["prob"] == pytest.approx(probs.max().item(), abs=1e-6)
    torch.testing.assert_close(ex.logits, logits)
    # 1. tokens and ids
    T = len(ex.ids)
    assert ex.ids == tok.encode(PROMPT) and "".join(ex.tokens) == PROMPT
    # 2. the embedding rows are the table's rows
    torch.testing.assert_close(ex.embed, model.wte.weight[idx[0]].detach())
    pos = model.wpe.weight[:T] if model.config.positional == "learned" else model.pe[:T]
    torch.testing.assert_close(ex.position, pos.detach())
    scale = model.config.d_model**0.5 if model.config.embed_scale else 1.0
    torch.testing.assert_close(ex.block_input, ex.embed * scale + ex.position)
    # 4. attention rows sum to 1, are causal, and equal reference_attention's weights
    for layer, w in enumerate(ex.attention):
        assert w.shape == (model.config.n_head, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(model.config.n_head, T))
        assert torch.all(w.triu(1) == 0)
        band = model.config.attn_band_of(layer)
        if band is not None:
            assert torch.all(w.tril(-band) == 0)
    x = (
        model.h[0].ln_1(ex.block_input[None])
        if model.config.norm == "pre"
        else ex.block_input[None]
    )
    q, k, _ = model.h[0].attn.c_attn(x).split(model.config.d_model, dim=2)
    H, D = model.config.n_head, model.config.head_dim
    q = q.view(1, T, H, D).transpose(1, 2)
    k = k.view(1, T, H, D).transpose(1, 2)
    eye = torch.eye(T).expand(1, H, T, T)  # weights @ I = the weights themselves
    torch.testing.assert_close(ex.attention[0], reference_attention(q, k, eye)[0].detach())
    # 5. a layer norm at init (gain 1, bias 0) maps each position to mean 0 and
    # std = std_in / sqrt(std_in^2 + eps): the before and after columns agree
    eps = model.config.layer_norm_eps
    for n in ex.norms:
        assert max(abs(m) for m in n.out_mean) < 1e-5
        for s_in, s_out in zip(n.in_std, n.out_std, strict=True):
            assert s_out == pytest.approx(s_in / (s_in**2 + eps) ** 0.5, rel=1e-4)
    # 6. GELU and leaky ReLU are exactly 0 only at 0: below zero and active split the units
    for f in ex.ffn:
        assert 0 < f["active"] < 1
        assert f["below_zero"] + f["active"] == pytest.approx(1.0, abs=1e-6)


def test_prompt_of_exactly_the_context_length_is_explained(gpt2_dir: Path) -> None:
    """Guards an off-by-one in the length check: a prompt of context_length tokens fits the
    model and is explained; one token more is refused with the one-line error."""
    model, tok = load(gpt2_dir)
    n = model.config.context_length
    ex = explain(model, tok, TEXT[:n])
    assert len(ex.ids) == n and ex.attention[0].shape == (model.config.n_head, n, n)
    torch.testing.assert_close(ex.logits, model(torch.tensor([ex.ids]))[0, -1])
    with pytest.raises(GptkitError, match=f"is {n + 1} tokens, longer than .* context of {n}"):
        explain(model, tok, TEXT[: n + 1])


def test_attention_table_is_the_last_tokens_row(model_dir: Path) -> None:
    """Guards table 4 reading another query's weights (the first token's, one-hot on
    itself) instead of the last token's, and an entropy that is not -sum(p log p) of them."""
    model, tok = load(model_dir)
    ex = explain(model, tok, PROMPT)
    title, header, rows = tables(ex)[1]
    column = {name: i for i, name in enumerate(header)}
    assert len(rows) == model.config.n_layer * model.config.n_head
    for row in rows:
        layer, h = int(row[column["layer"]]), int(row[column["head"]])
        p = ex.attention[layer][h, -1].double()  # (T,) the last query over the keys
        top = int(p.argmax())
        assert row[column["most attended"]] == f"{top} {ex.tokens[top]!r}"
        assert float(row[column["weight"]]) == pytest.approx(p[top].item(), abs=1e-3)
        entropy = -torch.special.xlogy(p, p).sum().item()  # 0 log 0 = 0 for masked keys
        assert float(row[column["entropy (nats)"]]) == pytest.approx(entropy, abs=1e-3)


def test_ffn_stats_are_of_the_activation_output(model_dir: Path) -> None:
    """Guards table 6 taken from the wrong tensor (c_fc's output, before the rectifier,
    has the same signs under GELU and leaky ReLU but another mean): its numbers are those
    of the activation applied here to c_fc's output, recorded by a hook of the test's own."""
    model, tok = load(model_dir)
    ex = explain(model, tok, PROMPT)
    cfg = model.config
    pre: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module, args, out: torch.Tensor) -> None:
            pre[i] = out[0].detach().double()  # (T, F)

        return hook

    handles = [block.mlp.c_fc.register_forward_hook(keep(i)) for i, block in enumerate(model.h)]
    try:
        model(torch.tensor([ex.ids]))
    finally:
        for handle in handles:
            handle.remove()
    for i, f in enumerate(ex.ffn):
        if cfg.activation == "gelu":
            a = F.gelu(pre[i], approximate="tanh")  # GPT-2's "gelu_new"
        else:
            assert cfg.activation == "leaky_relu"
            a = F.leaky_relu(pre[i], cfg.leaky_slope)
        assert f["below_zero"] == pytest.approx((a < 0).double().mean().item(), abs=1e-6)
        assert f["active"] == pytest.approx((a > 0).double().mean().item(), abs=1e-6)
        assert f["mean"] == pytest.approx(a.mean().item(), rel=1e-4, abs=1e-7)
        assert abs(a.mean() - pre[i].mean()) > 1e-4  # the rectifier moves the mean


def test_embedding_table_columns_add_up(model_dir: Path) -> None:
    """Guards table 1-3: its |embedding| is the vector the block input adds (scaled by
    sqrt(d_model) where the model scales it; it showed the unscaled row), |position| the
    position vector and |sum| their sum, for every position."""
    model, tok = load(model_dir)
    ex = explain(model, tok, PROMPT)
    title, header, rows = tables(ex)[0]
    idx = torch.tensor([tok.encode(PROMPT)])
    embed = model.wte(idx)[0] * (model.config.d_model**0.5 if model.config.embed_scale else 1)
    column = {name: i for i, name in enumerate(header)}
    for t, row in enumerate(rows):
        assert float(row[column["|embedding|"]]) == pytest.approx(embed[t].norm().item(), abs=2e-3)
        assert float(row[column["|position|"]]) == pytest.approx(
            ex.position[t].norm().item(), abs=2e-3
        )
        assert float(row[column["|sum|"]]) == pytest.approx(
            (embed[t] + ex.position[t]).norm().item(), abs=2e-3
        )
        assert float(row[column["|sum|"]]) == pytest.approx(
            ex.block_input[t].norm().item(), abs=2e-3
        )


def test_next_token_table_is_the_sampling_distribution(model_dir: Path) -> None:
    """Guards table 8: top_k rows (it showed one fewer), the k most probable tokens in order,
    the prob column softmax of the last logits (it showed the cumulative), the cumulative
    their running sum, and * on exactly the tokens sampling keeps: top-k, then top-p on the
    k survivors renormalised (it marked every top-k row)."""
    model, tok = load(model_dir)
    top_k, top_p = 6, 0.4
    ex = explain(model, tok, PROMPT, top_k=top_k, top_p=top_p)
    title, header, rows = tables(ex)[-1]
    column = {name: i for i, name in enumerate(header)}
    probs = torch.softmax(model(torch.tensor([ex.ids]))[0, -1].double(), dim=-1)  # (V,)
    best = torch.topk(probs, top_k).indices  # (k,) most probable first
    assert [int(row[column["id"]]) for row in rows] == best.tolist()
    # top-p as README states it: a token is kept while the (renormalised) mass of the
    # tokens ranked above it is still below p
    survivors = probs[best] / probs[best].sum()
    kept = (survivors.cumsum(0) - survivors < top_p).tolist()
    assert 0 < sum(kept) < top_k  # the cut falls inside the table
    g = torch.Generator().manual_seed(0)
    logits = ex.logits[None]
    drawn = {int(sample_next(logits, 1.0, top_k, top_p, generator=g)[0]) for _ in range(200)}
    assert drawn == {i for i, k in zip(best.tolist(), kept, strict=True) if k}
    for rank, row in enumerate(rows):
        i = best[rank]
        assert row[column["rank"]] == str(rank + 1)
        assert row[column["token"]] == repr(tok.decode([int(i)]))
        assert float(row[column["prob"]]) == pytest.approx(probs[i].item(), abs=1e-4)
        cum = probs[best[: rank + 1]].sum().item()
        assert float(row[column["cumulative"]]) == pytest.approx(cum, abs=1e-4)
        assert row[column["top-p"]] == ("*" if kept[rank] else "")


def test_top_p_mark_is_the_sampling_filter(model_dir: Path) -> None:
    """Guards the top-p cut marked at a different place than generate's top-p keeps."""
    model, tok = load(model_dir)
    ex = explain(model, tok, PROMPT, top_k=tok.vocab_size, top_p=0.5)
    kept = [r for r in ex.top if r["in_top_p"]]
    assert kept == ex.top[: len(kept)]  # a prefix of the ranking
    assert kept[-1]["cum"] >= 0.5 and (len(kept) == 1 or kept[-2]["cum"] < 0.5)


def test_top_p_mark_applies_to_the_top_k_survivors() -> None:
    """Guards the top-p marks computed over the whole vocabulary while sampling applies top-p
    to the top-k survivors, renormalised (README: temperature, top-k, top-p)."""
    tok = CharTokenizer.from_texts(["abcdefghijklmnopqrst"])
    V = tok.vocab_size  # 20 letters + end-of-text
    # The top 10 hold 0.86: over the vocabulary the 10th starts at 0.81 < 0.9 (kept), among
    # the 10 renormalised at 0.81 / 0.86 = 0.94 >= 0.9 (dropped).
    probs = torch.full((V,), 0.14 / (V - 10))
    probs[:10] = torch.tensor([0.1, 0.095, 0.093, 0.091, 0.09, 0.089, 0.087, 0.084, 0.081, 0.05])
    logits = probs.log()
    rows = top_tokens(logits, tok, top_k=10, top_p=0.9)
    marked = {r["id"] for r in rows if r["in_top_p"]}
    kept = top_p_filter(top_k_filter(logits[None], 10), 0.9)[0] > float("-inf")
    assert marked == set(torch.nonzero(kept).flatten().tolist()) == set(range(9))
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits[None], 1.0, 10, 0.9, generator=g)[0]) for _ in range(300)}
    assert drawn == marked  # what sampling really draws


def test_explain_restores_reference_attention(gpt2_dir: Path) -> None:
    """Guards explain switching the caller's reference attention off afterwards."""
    model, tok = load(gpt2_dir)
    model.set_reference_attention(True)
    explain(model, tok, PROMPT)
    assert all(block.attn.reference for block in model.h)
    model.set_reference_attention(False)
    explain(model, tok, PROMPT)
    assert not any(block.attn.reference for block in model.h)


def test_report_shows_dollar_and_markup_tokens_verbatim(gpt2_dir: Path, tmp_path: Path) -> None:
    """Guards matplotlib's ValueError on a token like "$$" (parsed as mathtext) in the plot
    labels, and unescaped token strings in the HTML tables. A BPE tokenizer has such
    multi-character tokens; the char tokenizer's are put in their place here."""
    model, tok = load(gpt2_dir)
    ex = explain(model, tok, PROMPT, top_k=4)
    odd = ["$$", "$x$", "<b>&x", "a$b$c"]
    ex.tokens[: len(odd)] = odd
    for row, t in zip(ex.top, odd, strict=True):
        row["token"] = t
    files = write_report(ex, tmp_path / "ex")
    for png in files[:2]:
        assert png.read_bytes().startswith(PNG_MAGIC)
    page = files[2].read_text()
    assert page == render_html(ex, files[:2])
    assert "&#x27;&lt;b&gt;&amp;x&#x27;" in page and "<b>" not in page
    assert "&#x27;$$&#x27;" in page


def test_terminal_tables_print_the_numbers(capsys, gpt2_dir: Path, tmp_path: Path) -> None:
    """Guards the printed top-1 probability and the files: valid PNGs and a self-contained page."""
    out = tmp_path / "ex"
    code, stdout, err = run_cli(capsys, "explain", gpt2_dir, "--prompt", PROMPT, "--out", out)
    assert code == 0, err
    model, tok = load(gpt2_dir)
    probs = torch.softmax(model(torch.tensor([tok.encode(PROMPT)]))[0, -1], dim=-1)
    row = re.search(r"^1 +'.*?' +\d+ +([0-9.]+)", stdout.split("8. next token")[1], re.M)
    assert float(row.group(1)) == pytest.approx(probs.max().item(), abs=1e-4)
    for title in ("1-3. tokens", "4. attention", "5. layer norms", "6. feed-forward"):
        assert title in stdout
    pngs = [out / "attention.png", out / "norms_and_top.png"]
    for png in pngs:
        assert png.read_bytes().startswith(PNG_MAGIC)
    page = (out / "explain.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    inlined = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert [base64.b64decode(s) for s in inlined] == [p.read_bytes() for p in pngs]
    assert "src='http" not in page and "<link" not in page  # nothing fetched from outside
    assert render_text(explain(model, tok, PROMPT)).splitlines()[0] in stdout


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "to be " * 5], "context of 16"),
        (["--prompt", PROMPT, "--top-p", "0"], "--top-p"),
        (["--prompt", PROMPT, "--top-p", "1.5"], "--top-p"),
        (["--prompt", PROMPT, "--top-k", "0"], "--top-k"),
    ],
)
def test_explain_errors_are_one_line(capsys, gpt2_dir: Path, flags: list[str], needle: str):
    """Guards tracebacks (or silent nonsense) on an empty, too long prompt or a bad cut."""
    code, _, err = run_cli(capsys, "explain", gpt2_dir, *flags)
    assert_one_line_error(code, err, needle)


def test_explain_missing_model_is_one_line(capsys, tmp_path: Path) -> None:
    """Guards a missing model directory surfacing as a traceback."""
    code, _, err = run_cli(capsys, "explain", tmp_path / "nope", "--prompt", PROMPT)
    assert_one_line_error(code, err)


def test_explain_out_that_cannot_be_a_directory(capsys, gpt2_dir: Path, tmp_path: Path) -> None:
    """Guards a FileExistsError traceback for `--out afile` (after the model ran)."""
    (tmp_path / "afile").write_text("not a directory")
    code, _, err = run_cli(
        capsys, "explain", gpt2_dir, "--prompt", PROMPT, "--out", tmp_path / "afile"
    )
    assert_one_line_error(code, err, "cannot write", "not a directory")
    assert (tmp_path / "afile").read_text() == "not a directory"
