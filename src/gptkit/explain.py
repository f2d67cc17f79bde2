"""`gptkit explain`: the spec's steps (DESIGN.md §1) on real numbers for one prompt.

One forward pass of the model itself, on the explicit reference attention path, with
forward hooks that record what each step produced: token ids, embedding and position
vectors, every head's attention weights, layer-norm statistics before and after, the
feed-forward rectifier's output, and the next-token distribution with the top-k / top-p
cut that sampling would apply. Nothing here recomputes the model's math.

    >>> model, tok = load("runs/demo")
    >>> ex = explain(model, tok, "To be, or not", top_k=10, top_p=0.9)
    >>> print(render_text(ex)); write_report(ex, "explain-out")
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gptkit.errors import GptkitError
from gptkit.fileio import atomic_path, atomic_write_text, make_dir
from gptkit.generate import filter_candidates, top_k_filter
from gptkit.model import GPT

N_VALUES = 4  # leading values of each vector shown
MAX_TICK_LABELS = 48  # token strings on the heatmap axes up to this many tokens


@dataclass
class NormStats:
    """Per-position mean and std of a layer norm's input and output."""

    name: str
    in_mean: list[float]
    in_std: list[float]
    out_mean: list[float]
    out_std: list[float]


@dataclass
class Explanation:
    tokens: list[str]  # each id decoded on its own
    ids: list[int]
    config: dict
    embed: torch.Tensor  # (T, C) token embedding rows, as looked up (before any scale)
    position: torch.Tensor  # (T, C) position vectors added
    block_input: torch.Tensor  # (T, C) what enters the first layer: embedding + positions
    attention: list[torch.Tensor]  # per layer (H, T, T), rows sum to 1
    bands: list[int | None]  # per layer: None dense, else the band width
    norms: list[NormStats]
    ffn: list[dict[str, float]]  # per layer: share < 0, share > 0, mean of the rectifier output
    logits: torch.Tensor  # (V,) the model's logits at the last position
    top: list[dict] = field(default_factory=list)  # top-K rows: id, token, prob, cum, in_top_p
    top_k: int = 10
    top_p: float = 0.9


def check_cut(top_k: int, top_p: float) -> None:
    if top_k < 1:
        raise GptkitError(f"--top-k must be >= 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise GptkitError(f"--top-p must be in (0, 1], got {top_p}")


def check_options(n_tokens: int, context_length: int, top_k: int, top_p: float) -> None:
    check_cut(top_k, top_p)
    if n_tokens == 0:
        raise GptkitError("--prompt is empty: give some text to explain")
    if n_tokens > context_length:
        raise GptkitError(
            f"the prompt is {n_tokens} tokens, longer than the model's context of {context_length}"
        )


def token_string(tokenizer, i: int) -> str:
    """One id as text; a BPE piece that is part of a UTF-8 character shows as U+FFFD."""
    return tokenizer.decode_bytes([i]).decode("utf-8", errors="replace")


@torch.no_grad()
def explain(model: GPT, tokenizer, prompt: str, top_k: int = 10, top_p: float = 0.9) -> Explanation:
    """Run `prompt` through `model` once and collect every step's numbers."""
    cfg = model.config
    ids = tokenizer.encode(prompt)
    check_options(len(ids), cfg.context_length, top_k, top_p)
    top_k = min(top_k, cfg.vocab_size)
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    T = len(ids)

    seen: dict[str, torch.Tensor] = {}
    norm_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, batched: bool = True):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[name] = (out[0] if batched else out).detach().float().cpu()  # batch row 0

        return hook

    def keep_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name] = args[0][0].detach().float().cpu()

        return hook

    def keep_norm(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            norm_io[name] = (args[0][0].detach().float().cpu(), out[0].detach().float().cpu())

        return hook

    handles = [
        model.wte.register_forward_hook(keep("wte")),
        model.h[0].register_forward_pre_hook(keep_input("block_input")),
    ]
    if cfg.positional == "learned":
        # wpe is called on (T,) positions, so its output has no batch dimension
        handles.append(model.wpe.register_forward_hook(keep("wpe", batched=False)))
    for i, block in enumerate(model.h):
        handles.append(block.attn.attn_weights.register_forward_hook(keep(f"attn{i}")))
        # The rectifier's output is what enters the second feed-forward matrix.
        handles.append(block.mlp.c_proj.register_forward_pre_hook(keep_input(f"ffn{i}")))
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(keep_norm(name)))
    was_training = model.training
    was_reference = [block.attn.reference for block in model.h]
    model.eval()
    model.set_reference_attention(True)  # only the explicit path exposes the weights
    try:
        logits = model(idx)[0, -1].float().cpu()  # (V,)
    finally:
        for block, ref in zip(model.h, was_reference, strict=True):  # as the caller had it
            block.attn.reference = ref
        model.train(was_training)
        for h in handles:
            h.remove()

    position = seen["wpe"] if "wpe" in seen else model.pe[:T].float().cpu()
    norms = []
    for name, (x, y) in norm_io.items():
        norms.append(
            NormStats(
                name,
                x.mean(-1).tolist(),
                x.std(-1, unbiased=False).tolist(),
                y.mean(-1).tolist(),
                y.std(-1, unbiased=False).tolist(),
            )
        )
    ffn = []
    for i in range(cfg.n_layer):
        a = seen[f"ffn{i}"]  # (T, F)
        ffn.append(
            {
                "below_zero": (a < 0).float().mean().item(),
                "active": (a > 0).float().mean().item(),
                "mean": a.mean().item(),
            }
        )
    ex = Explanation(
        tokens=[token_string(tokenizer, i) for i in ids],
        ids=ids,
        config=cfg.to_dict(),
        embed=seen["wte"],
        position=position,
        block_input=seen["block_input"],
        attention=[seen[f"attn{i}"] for i in range(cfg.n_layer)],
        bands=[cfg.attn_band_of(i) for i in range(cfg.n_layer)],
        norms=norms,
        ffn=ffn,
        logits=logits,
        top_k=top_k,
        top_p=top_p,
    )
    ex.top = top_tokens(logits, tokenizer, top_k, top_p)
    return ex


def top_tokens(logits: torch.Tensor, tokenizer, top_k: int, top_p: float) -> list[dict]:
    """The K most likely next tokens; `in_top_p` is what sampling's top-p filter keeps.

    As `generate.sample` does (temperature 1): top-p applies to the top-k survivors,
    renormalised, not to the whole vocabulary.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    kept_k = top_k_filter(logits[None], top_k)[0] > float("-inf")
    kept_p = top_p_kept(logits, top_k, top_p)
    order = torch.sort(probs, descending=True, stable=True).indices[:top_k]
    rows, cum = [], 0.0
    for i in order.tolist():
        cum += probs[i].item()
        rows.append(
            {
                "id": i,
                "token": token_string(tokenizer, i),
                "prob": probs[i].item(),
                "cum": cum,
                "in_top_p": bool(kept_p[i]),
                "in_top_k": bool(kept_k[i]),
            }
        )
    return rows


def top_p_kept(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(V,) bool: the tokens sampling keeps after top-k, then top-p on the k survivors."""
    V = logits.shape[-1]
    kept, ids = filter_candidates(logits.float()[None], top_k, top_p)  # as sampling does
    ids = torch.arange(V) if ids is None else ids[0]
    out = torch.zeros(V, dtype=torch.bool)
    out[ids[kept[0] > float("-inf")]] = True
    return out


# --------------------------------------------------------------------------- text


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _vec(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in x[:N_VALUES].tolist()) + ", ...]"


def tables(ex: Explanation) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table: the terminal and the HTML show the same ones."""
    c = ex.config
    out = []
    scale = " x sqrt(d_model)" if c["embed_scale"] else ""
    # As the block input adds it: scaled where the model scales it (|sum| then follows).
    embed = ex.embed * (c["d_model"] ** 0.5 if c["embed_scale"] else 1.0)
    out.append(
        (
            f"1-3. tokens, embeddings{scale}, {c['positional']} positions (norms, first values)",
            ["pos", "token", "id", "|embedding|", "|position|", "|sum|", "embedding", "position"],
            [
                [
                    str(t),
                    repr(tok),
                    str(i),
                    f"{embed[t].norm():.3f}",
                    f"{ex.position[t].norm():.3f}",
                    f"{ex.block_input[t].norm():.3f}",
                    _vec(embed[t]),
                    _vec(ex.position[t]),
                ]
                for t, (tok, i) in enumerate(zip(ex.tokens, ex.ids, strict=True))
            ],
        )
    )
    rows = []
    for layer, w in enumerate(ex.attention):
        for h in range(w.shape[0]):
            last = w[h, -1]  # the last token's weights over the prompt
            top = int(last.argmax())
            entropy = -(last[last > 0] * last[last > 0].log()).sum().item()
            band = "dense" if ex.bands[layer] is None else f"band {ex.bands[layer]}"
            rows.append(
                [
                    str(layer),
                    str(h),
                    band,
                    f"{top} {ex.tokens[top]!r}",
                    f"{last[top]:.3f}",
                    f"{entropy:.3f}",
                ]
            )
    out.append(
        (
            "4. attention of the last token, per layer and head (full grids in attention.png)",
            ["layer", "head", "pattern", "most attended", "weight", "entropy (nats)"],
            rows,
        )
    )
    ffn_dim = 4 * c["d_model"] if c["d_ff"] is None else c["d_ff"]
    out.append(
        (
            "5. layer norms: mean / std over channels, averaged over positions (before -> after)",
            ["norm", "mean in", "std in", "mean out", "std out", "std out range"],
            [
                [
                    n.name,
                    f"{_mean(n.in_mean):+.4f}",
                    f"{_mean(n.in_std):.4f}",
                    f"{_mean(n.out_mean):+.4f}",
                    f"{_mean(n.out_std):.4f}",
                    f"{min(n.out_std):.3f}..{max(n.out_std):.3f}",
                ]
                for n in ex.norms
            ],
        )
    )
    out.append(
        (
            f"6. feed-forward: the {c['activation']} output, {ffn_dim} units per position",
            ["layer", "share < 0", "share active (> 0)", "mean"],
            [
                [str(i), f"{f['below_zero']:.3f}", f"{f['active']:.3f}", f"{f['mean']:+.4f}"]
                for i, f in enumerate(ex.ffn)
            ],
        )
    )
    out.append(
        (
            f"8. next token: top {ex.top_k} (softmax of the last logits); "
            f"top-p {ex.top_p:g} keeps the rows marked *",
            ["rank", "token", "id", "prob", "cumulative", "top-p"],
            [
                [
                    str(r + 1),
                    repr(row["token"]),
                    str(row["id"]),
                    f"{row['prob']:.4f}",
                    f"{row['cum']:.4f}",
                    "*" if row["in_top_p"] else "",
                ]
                for r, row in enumerate(ex.top)
            ],
        )
    )
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def render_text(ex: Explanation) -> str:
    c = ex.config
    head = (
        f"model: {c['n_layer']} layers, {c['n_head']} heads, d_model {c['d_model']}, "
        f"{c['norm']}-LN, {c['activation']}, {c['positional']} positions, "
        f"attention {c['attention']}; prompt of {len(ex.ids)} tokens"
    )
    parts = [head]
    for title, header, rows in tables(ex):
        parts.append(f"\n{title}\n{_table(header, rows)}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- files


def plot_attention(ex: Explanation, path: Path) -> None:
    """One heatmap per (layer, head): rows are queries, columns keys, token strings on axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H, T = len(ex.attention), ex.attention[0].shape[0], len(ex.ids)
    cell = min(2.6, max(1.2, 0.12 * T + 0.8))
    fig, axes = plt.subplots(L, H, figsize=(cell * H + 1, cell * L + 1), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in ex.tokens]
    for layer in range(L):
        for h in range(H):
            ax = axes[layer][h]
            ax.imshow(ex.attention[layer][h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            band = "" if ex.bands[layer] is None else f" (band {ex.bands[layer]})"
            ax.set_title(f"L{layer} H{h}{band}", fontsize=7)
            if T <= MAX_TICK_LABELS:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(T), labels, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle("attention weights: query (row) over key (column)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_norms_and_top(ex: Explanation, path: Path) -> None:
    """Layer-norm std before/after per position, and the top-K bars with the top-p cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for n in ex.norms:
        ax1.plot(n.in_std, "--", alpha=0.6, label=f"{n.name} in")
        ax1.plot(n.out_std, "-", alpha=0.8, label=f"{n.name} out")
    ax1.set(title="layer norm: std per position", xlabel="position", yscale="log")
    ax1.legend(fontsize=5, ncol=2)
    probs = [r["prob"] for r in ex.top]
    colors = ["tab:blue" if r["in_top_p"] else "tab:gray" for r in ex.top]
    ax2.bar(range(len(probs)), probs, color=colors)
    ax2.set_xticks(range(len(probs)), [repr(r["token"]) for r in ex.top], rotation=60, fontsize=6)
    kept = sum(r["in_top_p"] for r in ex.top)
    if 0 < kept < len(probs):
        ax2.axvline(kept - 0.5, color="red", linestyle="--", label=f"top-p {ex.top_p:g} cut")
        ax2.legend()
    ax2.set(title=f"next token: top {ex.top_k} probabilities", ylabel="probability")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def render_html(ex: Explanation, images: list[Path]) -> str:
    """One self-contained page: the tables, and the PNGs inlined as base64."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>gptkit explain</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;font-family:monospace}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>gptkit explain</h1><p>{html.escape(render_text(ex).splitlines()[0])}</p>",
    ]
    for title, header, rows in tables(ex):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in header]
        parts.append("</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(img.name)}</h2>")
        parts.append(f"<img alt='{html.escape(img.name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(ex: Explanation, out: str | Path) -> list[Path]:
    """attention.png, norms_and_top.png and explain.html (self-contained) in `out`."""
    out = make_dir(out)  # a GptkitError where it cannot be a directory
    images = [out / "attention.png", out / "norms_and_top.png"]
    import matplotlib

    # Token strings are plain text: "$x$" in a label would otherwise parse as mathtext
    # (and "$$" or an unbalanced "$" fail to).
    with matplotlib.rc_context({"text.parse_math": False}):
        plot_attention(ex, images[0])
        plot_norms_and_top(ex, images[1])
    page = out / "explain.html"
    atomic_write_text(page, render_html(ex, images))
    return [*images, page]
