"""The GPT model: embedding, positions, causal self-attention, feed-forward, blocks.

A pure `nn.Module`. `GPT(config)(idx)` maps token ids (B, T) to next-token logits
(B, T, vocab_size); the loss belongs to the training code. Parameter names follow
GPT-2's (`wte`, `wpe`, `h.N.ln_1`, `h.N.attn.c_attn`, ...) so that Hugging Face
conversion is a short mapping.

Shape letters used throughout: B batch, T time (new tokens), S keys attended to
(cached + new), C channels (d_model), H heads, D head_dim, V vocabulary.

    >>> model = GPT(GPTConfig.from_preset("seed-tiny", vocab_size=65))
    >>> logits = model(torch.zeros(2, 8, dtype=torch.long))  # (2, 8, 65)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptkit import kernels
from gptkit.config import GPTConfig

# The native decode step's activation codes (csrc/decode.cpp).
NATIVE_ACTIVATIONS = {"gelu": 0, "relu": 1, "leaky_relu": 2}

# What a KV cache may store its keys and values in, by the CLI's names (--kv-cache).
KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The attention kernels inference may use on CUDA: all but cuDNN's (see `_attention_backends`).
PLANLESS_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """(n_positions, d_model): sin on even dimensions, cos on odd, wavelengths 10000^(2i/d).

    Vaswani et al. 2017, §3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)),
    PE(pos, 2i+1) = cos(pos / 10000^(2i/d)). Computed in float64 for accuracy.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(d/2),)
    angles = pos / torch.pow(10000.0, two_i / d_model)  # (P, ceil(d/2))
    pe = torch.zeros(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return pe.float()


def _cache_length(config: GPTConfig, max_len: int | None) -> int:
    """A KV cache's positions: `max_len`, or the whole context when None; checked."""
    max_len = config.context_length if max_len is None else max_len
    if not 1 <= max_len <= config.context_length:
        raise ValueError(f"max_len must be in [1, {config.context_length}], got {max_len}")
    return max_len


def _cache_tensors(
    config: GPTConfig,
    rows: int,
    max_len: int | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(max_len, keys, values) for a KV cache: zeros of shape (L, rows, H, S_max, D)."""
    max_len = _cache_length(config, max_len)
    shape = (config.n_layer, rows, config.n_head, max_len, config.head_dim)
    k = torch.zeros(shape, device=device, dtype=dtype)
    return max_len, k, torch.zeros_like(k)


class KVCache:
    """Preallocated keys and values for every layer, filled up to `pos`.

    It holds tensors and a position, nothing of the model. `GPT.forward` writes the new
    keys and values of each layer at [pos, pos + T) and, after the last layer, advances
    `pos` by T in one explicit step.

    A banded layer (`config.attention == "alternating"`) never looks further back than its
    band, so when the band is shorter than `max_len` its keys and values live in a ring
    buffer of `band` positions instead (position p in slot p % band); `self.k`/`self.v`
    then hold only the dense layers, `self.slot[layer]` says where. `ring_buffers=False`
    keeps every layer at full length (a server copies such a cache into a `SlotKVCache`).

    `dtype` is what the keys and values are stored in; `update` hands them back in the
    dtype they came in. A bfloat16 cache under a fp32 model halves the cache's memory and
    what every decode step reads from it (at position p, 2 x n_layer x p x d_model values:
    at long contexts, the larger part of an int8 model's bytes per token), for keys and
    values rounded to 8 significant bits.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        ring_buffers: bool = True,
    ) -> None:
        self.max_len = _cache_length(config, max_len)
        bands = [config.attn_band_of(i) for i in range(config.n_layer)]
        ringed = [
            i for i, b in enumerate(bands) if ring_buffers and b is not None and b < self.max_len
        ]
        dense = [i for i in range(config.n_layer) if i not in ringed]
        self.slot = {layer: n for n, layer in enumerate(dense)} | {
            layer: n for n, layer in enumerate(ringed)
        }
        self.ringed = frozenset(ringed)
        # The native decode step's view of `slot`: i for k[i], -1 - i for ring_k[i].
        self.native_slots = [
            -1 - self.slot[i] if i in self.ringed else self.slot[i] for i in range(config.n_layer)
        ]
        shape = (len(dense), batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L_dense, B, H, S_max, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        ring = (len(ringed), batch_size, config.n_head, config.attn_band, config.head_dim)
        self.ring_k = torch.zeros(ring, device=device, dtype=dtype)  # (L_banded, B, H, W, D)
        self.ring_v = torch.zeros(ring, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """What the keys and values are stored in (`update` hands them back in the
        dtype they came in: a bf16 cache halves the memory and what each token reads)."""
        return self.k.dtype

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values at [pos, pos + T); return all S = pos + T of them.

        For a ring-buffered layer: the S <= band - 1 + T most recent ones, positions
        [pos + T - S, pos + T), which is all its band lets the new queries see.
        """
        if layer in self.ringed:
            return self._update_ring(self.slot[layer], k, v)
        layer = self.slot[layer]
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end].to(k.dtype), self.v[layer, :, :, :end].to(v.dtype)

    def _update_ring(
        self, i: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        W, T, pos, dtype = self.ring_k.shape[3], k.shape[2], self.pos, k.dtype
        k, v = k.to(self.dtype), v.to(self.dtype)  # rounded as stored
        # The cached positions a new query can still see: [pos - W + 1, pos), in order.
        past = torch.arange(max(0, pos - W + 1), pos, device=k.device) % W
        k_all = torch.cat([self.ring_k[i][:, :, past], k], dim=2)  # (B, H, S, D)
        v_all = torch.cat([self.ring_v[i][:, :, past], v], dim=2)
        # Keep the last min(T, W) new positions for the next call.
        n = min(T, W)
        slots = torch.arange(pos + T - n, pos + T, device=k.device) % W
        self.ring_k[i][:, :, slots] = k[:, :, T - n :]
        self.ring_v[i][:, :, slots] = v[:, :, T - n :]
        return k_all.to(dtype), v_all.to(dtype)

    def positions_held(self, layer: int) -> int:
        """How many positions of keys (and of values) `layer` can hold: its memory."""
        return self.ring_k.shape[3] if layer in self.ringed else self.max_len

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class SlotKVCache:
    """A KV cache with one slot per sequence, each at its own length (continuous batching).

    `KVCache` keeps one position for the whole batch; a server decodes sequences that
    started at different times, so here every row r has its own `lengths[r]`. A forward
    pass with this cache runs on rows [0, B) for idx (B, T): row r's new tokens sit at
    positions [lengths[r], lengths[r] + T), its keys are written there, and it attends
    only to its own keys below that (a per-row key mask). Keys past a shorter row's
    length are leftovers from earlier occupants and are masked out, never read.
    The scheduler keeps the live rows packed at [0, B) with `move` (a finished row is
    replaced by the last one) and fills a row from a one-sequence `KVCache` with `load`.

    `static = True` makes every forward pass attend over all `max_len` positions, those
    past a row's length masked out, and read no tensor's value on the host (the room
    check is then the caller's): a step's shapes and work no longer depend on the
    lengths, so a CUDA graph can capture one decode step and replay it for the next.
    """

    def __init__(
        self,
        config: GPTConfig,
        n_slots: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len, self.k, self.v = _cache_tensors(config, n_slots, max_len, device, dtype)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)  # (N,)
        self.static = False

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def positions(self, B: int, T: int) -> torch.Tensor:
        """(B, T) absolute positions of the next T tokens of rows [0, B)."""
        return self.lengths[:B, None] + torch.arange(T, device=self.lengths.device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, band: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values at each row's own positions.

        Returns keys and values (B, H, S, D), S = the longest row's new length (`max_len`
        when `static`), and the boolean key mask (B, 1, T, S): query t of row r sees key s
        iff s <= lengths[r] + t (and, for a banded layer, s > lengths[r] + t - band).
        """
        B, _, T, _ = k.shape
        pos = self.positions(B, T)  # (B, T)
        rows = torch.arange(B, device=pos.device)[:, None]  # (B, 1)
        dtype = self.k.dtype  # index_put takes no other
        self.k[layer][rows, :, pos] = k.transpose(1, 2).to(dtype)  # indexed view: (B, T, H, D)
        self.v[layer][rows, :, pos] = v.transpose(1, 2).to(dtype)
        S = self.max_len if self.static else int(self.lengths[:B].max()) + T
        keys = torch.arange(S, device=pos.device)  # (S,)
        mask = keys[None, None, :] <= pos[:, :, None]  # (B, T, S)
        if band is not None:
            mask &= keys[None, None, :] > pos[:, :, None] - band
        keys, values = self.k[layer, :B, :, :S].to(k.dtype), self.v[layer, :B, :, :S].to(v.dtype)
        return keys, values, mask[:, None]

    def advance(self, B: int, n: int) -> None:
        self.lengths[:B] += n

    def load(self, row: int, cache: KVCache, batch_row: int = 0) -> None:
        """Copy the filled part of a (prefilled) `KVCache` row into slot `row`.

        The cache must keep every layer at full length (`ring_buffers=False`).
        """
        if cache.ringed:
            raise ValueError("a ring-buffered KVCache cannot fill a slot; use ring_buffers=False")
        n = cache.pos
        if n > self.max_len:
            raise ValueError(f"{n} cached positions do not fit a slot of {self.max_len}")
        self.k[:, row, :, :n] = cache.k[:, batch_row, :, :n]
        self.v[:, row, :, :n] = cache.v[:, batch_row, :, :n]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` (its filled part) into slot `dst`."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. q, k, v come from one fused projection (`c_attn`)."""

    def __init__(self, config: GPTConfig, band: int | None = None) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.band = band  # None: dense causal; else query t sees keys (t - band, t]
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        # The spec concatenates the heads and stops; GPT-2/3 add an output projection.
        self.c_proj = (
            nn.Linear(config.d_model, config.d_model, bias=config.bias)
            if config.attn_out_proj
            else None
        )
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.reference = False  # True: explicit softmax(QK^T/sqrt(D))V instead of SDPA
        # The reference path's (B, H, T, S) weights pass through here: a forward-hook point
        # (`gptkit explain` reads them) that holds no parameters and computes nothing.
        self.attn_weights = nn.Identity()

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | SlotKVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.shape  # batch, time, channels
        qkv = self.c_attn(x)  # (B, T, 3C)
        if kv_cache is None and self._native_fits(qkv):
            y = kernels.causal_attention(qkv, self.n_head)  # (B, T, C): heads concatenated
            return self.resid_dropout(self.c_proj(y) if self.c_proj is not None else y)
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if isinstance(kv_cache, SlotKVCache):  # rows at different lengths: a mask per row
            k, v, mask = kv_cache.update(layer, k, v, self.band)  # mask (B, 1, T, S)
            y = masked_attention(q, k, v, mask, self.reference)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y) if self.c_proj is not None else y)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, D): the S keys up to the last query
        offset = k.shape[2] - T  # the queries are the last T of the S key positions
        if self.reference:
            y = self.attn_weights(attention_weights(q, k, offset, self.band)) @ v  # (B, H, T, D)
        else:
            p = self.dropout if self.training else 0.0
            y = _fast_attention(q, k, v, offset, p, self.band)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads concatenated
        if self.c_proj is not None:
            y = self.c_proj(y)
        return self.resid_dropout(y)

    def _native_fits(self, qkv: torch.Tensor) -> bool:
        """Whether `kernels.causal_attention` computes this call: whole sequences of fp32
        on a CPU, plain causal attention, no attention dropout, heads of a whole number of
        vectors, and the kernels built. Elsewhere scaled_dot_product_attention does."""
        T = qkv.shape[1]
        return (
            not self.reference
            and qkv.device.type == "cpu"
            and qkv.dtype == torch.float32
            and not (self.training and self.dropout > 0)
            and (self.band is None or self.band >= T)
            and self.head_dim % kernels.ATTENTION_HEAD_MULTIPLE == 0
            and T <= kernels.ATTENTION_MAX_T
            and kernels.training_namespace() is not None
        )


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, S) bool, True where query t (at absolute position S - T + t) may see key s."""
    offset = S - T
    rows = torch.arange(T, device=device)[:, None] + offset
    return torch.arange(S, device=device)[None, :] <= rows


def banded_causal_mask(
    T: int, S: int, band: int, device: torch.device | None = None
) -> torch.Tensor:
    """(T, S) bool, True where query t (at position S - T + t) may see key s: causal and
    within the band, S - T + t - band < s <= S - T + t (GPT-3's locally banded layers)."""
    offset = S - T
    rows = torch.arange(T, device=device)[:, None] + offset  # (T, 1) query positions
    cols = torch.arange(S, device=device)[None, :]  # (1, S) key positions
    return (cols <= rows) & (cols > rows - band)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int = 0, band: int | None = None
) -> torch.Tensor:
    """The spec's attention, written out: softmax(Q K^T / sqrt(D), causal) V.

    q (B, H, T, D) at positions [offset, offset + T); k, v (B, H, S, D) at [0, S).
    With `band`, query t sees only the keys (t - band, t]. Returns (B, H, T, D).
    The plain path the fast one is tested against.
    """
    return attention_weights(q, k, offset, band) @ v  # (B, H, T, D)


def attention_weights(
    q: torch.Tensor, k: torch.Tensor, offset: int = 0, band: int | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D), causal or banded): (B, H, T, S), each row sums to 1."""
    T, S = q.shape[2], k.shape[2]
    assert offset + T == S, "keys must cover every position up to the last query"
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = causal_mask(T, S, q.device) if band is None else banded_causal_mask(T, S, band, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)  # rows sum to 1


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, reference: bool
) -> torch.Tensor:
    """Attention under an explicit boolean key mask (B, 1, T, S), True = may attend.

    q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D). `reference` writes it out.
    """
    if not reference:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, H, T, D)


def _fast_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offset: int,
    dropout_p: float,
    band: int | None = None,
) -> torch.Tensor:
    """Fused scaled_dot_product_attention with the same causal semantics as the reference."""
    T, S = q.shape[2], k.shape[2]
    if band is not None and band < S:  # some key is out of some query's band: explicit mask
        mask = banded_causal_mask(T, S, band, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if T == S:  # no cache or empty cache: plain causal attention
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # A chunk appended to a cache: is_causal would align the mask top-left, so pass it.
    mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Eager mode calls ATen's single fused kernel. Under torch.compile the same function is
    spelled x * sigmoid(2u), an identity since 0.5 (1 + tanh(u)) = sigmoid(2u): inductor
    vectorizes sigmoid far better than tanh on CPU (a training step of the 4-layer
    Shakespeare model ran ~10% faster; see benchmarks/RESULTS.md).
    """
    if torch.compiler.is_compiling():
        return gelu_tanh_sigmoid(x)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh` written as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))."""
    return x * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))


class MLP(nn.Module):
    """Feed-forward: linear (C -> F), rectifier, linear (F -> C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.ffn_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_dim, config.d_model, bias=config.bias)
        self.activation, self.leaky_slope = config.activation, config.leaky_slope
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self._native_fits(x):  # c_fc's product without its bias, then one native pass
            h = F.linear(x, self.c_fc.weight)  # (B, T, F)
            if self.activation == "gelu":
                h = kernels.bias_gelu(h, self.c_fc.bias)
            else:  # ReLU is the leaky ReLU at slope 0
                slope = self.leaky_slope if self.activation == "leaky_relu" else 0.0
                h = kernels.bias_leaky_relu(h, self.c_fc.bias, slope)
            return self.dropout(self.c_proj(h))
        h = self.c_fc(x)  # (B, T, F)
        if self.activation == "gelu":
            h = gelu_tanh(h)  # GPT-2's "gelu_new"
        else:
            # In place where no hook holds c_fc's output: autograd then keeps only the
            # result (which c_proj keeps anyway), not the input too. ATen's in-place leaky
            # ReLU needs a positive slope for that.
            private = not has_hooks(self.c_fc)
            if self.activation == "leaky_relu":
                h = F.leaky_relu(h, self.leaky_slope, inplace=private and self.leaky_slope > 0)
            else:
                h = F.relu(h, inplace=private)
        return self.dropout(self.c_proj(h))

    def _native_fits(self, x: torch.Tensor) -> bool:
        """Whether `kernels.bias_gelu` or `kernels.bias_leaky_relu` applies c_fc's bias and
        the activation: fp32 on a CPU (not under bf16 autocast), c_fc a plain nn.Linear
        with a bias (not a quantized one) and no hook on it (the fused path does not call
        it), a leaky slope >= 0 (the kernel's backward reads the output's sign), and the
        kernels built."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and type(self.c_fc) is nn.Linear
            and self.c_fc.bias is not None
            and not (self.activation == "leaky_relu" and self.leaky_slope < 0)
            and not has_hooks(self.c_fc)
            and kernels.training_namespace() is not None
        )


class Block(nn.Module):
    """One transformer layer: attention and feed-forward, each with a residual and a norm.

    post-LN (the spec, and the original Transformer): x = LN(x + sublayer(x)).
    pre-LN (GPT-2/3): x = x + sublayer(LN(x)).
    """

    def __init__(self, config: GPTConfig, band: int | None = None) -> None:
        super().__init__()
        self.post_norm = config.norm == "post"
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, band)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | SlotKVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, kv_cache, layer))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))

    def native_tensors(self) -> list[torch.Tensor | None]:
        """The tensors the native decode step reads for this block, in its order.

        ln_1 and ln_2 (weight, bias), then (weight, scale, bias) of attn.c_attn,
        attn.c_proj, mlp.c_fc and mlp.c_proj: nn.Linear or quantize's WeightOnlyLinear,
        None where a module, a scale or a bias is absent. Read from the modules' own
        dicts, once per decode step: nn.Module's attribute lookups cost ~0.9 ms per gpt2
        token here, a tenth of an int8 token.
        """
        blocks = self._modules
        attn, mlp = blocks["attn"]._modules, blocks["mlp"]._modules
        parts = [(blocks["ln_1"], NORM_TENSORS), (blocks["ln_2"], NORM_TENSORS)]
        parts += [(attn["c_attn"], LINEAR_TENSORS), (attn.get("c_proj"), LINEAR_TENSORS)]
        parts += [(mlp["c_fc"], LINEAR_TENSORS), (mlp["c_proj"], LINEAR_TENSORS)]
        return [_own_tensor(module, name) for module, names in parts for name in names]


NORM_TENSORS = ("weight", "bias")
LINEAR_TENSORS = ("weight", "scale", "bias")


def _own_tensor(module: nn.Module | None, name: str) -> torch.Tensor | None:
    """`module`'s parameter or buffer `name`; None when it has none (or there is no module)."""
    if module is None:
        return None
    found = module._parameters.get(name)
    return found if found is not None else module._buffers.get(name)


def _lookup(table: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """table(idx); under torch.compile on a CPU through `kernels.embedding` where the table
    is a plain fp32 nn.Embedding without hooks and idx int64, so that the backward pass adds
    rows with plain vector adds instead of inductor's atomics (kernels.embedding says why)."""
    if (
        torch.compiler.is_compiling()
        and idx.device.type == "cpu"
        and idx.dtype == torch.int64
        and type(table) is nn.Embedding
        and table.weight.dtype == torch.float32
        and table.padding_idx is None
        and table.max_norm is None
        and not (table.scale_grad_by_freq or table.sparse)
        and not has_hooks(table)
        and kernels.training_namespace() is not None
    ):
        return kernels.embedding(table.weight, idx)
    return table(idx)


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The scaled_dot_product_attention kernels a forward pass may pick: on CUDA without
    autograd (decoding, evaluation) all but cuDNN's; elsewhere any.

    cuDNN's attention builds an execution plan for each new shape, and decoding brings a
    new key length every step: on an H200 (torch 2.11) that cost 3.6 ms per call, ~45 ms
    per gpt2 step, and decoding ran at 13.5 tokens/s at batch 1 where flash attention,
    which needs no plan, gave 201 (benchmarks/RESULTS.md, session 12). Training keeps it:
    its shapes repeat, so its plans are built once.
    """
    if device.type == "cuda" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return sdpa_kernel(PLANLESS_ATTENTION)
    return contextlib.nullcontext()


def has_hooks(root: nn.Module) -> bool:
    """True if a forward hook or forward pre-hook would run for `root` or a module below it
    (its own, or one registered for every module)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    stack = [root]
    while stack:  # plain loops: this runs once per decode step
        module = stack.pop()
        if module is None:
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            return True
        stack += module._modules.values()
    return False


class GPT(nn.Module):
    """Decoder-only transformer language model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.positional == "learned":
            self.wpe = nn.Embedding(config.context_length, config.d_model)
        else:
            # Not a parameter and not saved: it is a function of the config.
            pe = sinusoidal_positions(config.context_length, config.d_model)
            self.register_buffer("pe", pe, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, config.attn_band_of(i)) for i in range(config.n_layer))
        self.ln_f = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
            if config.final_norm
            else None
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one tensor, two uses
        # A CPU decode step runs in one native op where it applies (see
        # `native_step_op`); False keeps every step on the eager modules.
        self.native_decode = True
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).

        Radford et al. 2019, §2.3. Biases zero, layer norms gain 1 and bias 0.
        """
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_resid = name.endswith("attn.c_proj") or name.endswith("mlp.c_proj")
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_resid else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters, each tensor counted once (tied weights once)."""
        return sum(p.numel() for p in self.parameters())

    def set_reference_attention(self, enabled: bool = True) -> None:
        """Switch every layer to the explicit attention path (for tests and `explain`)."""
        for block in self.h:
            block.attn.reference = enabled

    def forward(
        self, idx: torch.Tensor, kv_cache: KVCache | SlotKVCache | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V).

        With `kv_cache`, `idx` holds the next T tokens after the `kv_cache.pos` cached ones;
        their keys and values are appended and the cache advances by T.
        """
        op = self.native_step_op(idx, kv_cache)
        if op is not None:  # a CPU decode step (see `native_step_op`): one native call
            return self._native_step(op, idx, kv_cache)[:, None]  # (B, 1, V)
        return self.lm_head(self.hidden_states(idx, kv_cache))  # (B, T, V)

    def _check_room(self, kv_cache: KVCache | SlotKVCache | None, end: int) -> None:
        """Raise ValueError unless a sequence (the longest row) of `end` tokens fits the
        context and the cache."""
        if isinstance(kv_cache, SlotKVCache):
            if end > min(self.config.context_length, kv_cache.max_len):
                raise ValueError(f"a row of {end} tokens exceeds the slot cache or the context")
            return
        if end > self.config.context_length:
            raise ValueError(
                f"sequence of {end} tokens exceeds the context length {self.config.context_length}"
            )
        if kv_cache is not None and end > kv_cache.max_len:
            raise ValueError(f"KV cache of {kv_cache.max_len} positions is full")

    def native_step_op(
        self, idx: torch.Tensor, kv_cache: KVCache | SlotKVCache | None
    ) -> Callable[..., torch.Tensor] | None:
        """The native `decode_step` op if it may run this forward pass, else None.

        It applies to a decode step on a CPU: one new int64 token per row, at most
        `kernels.MAX_ROWS` rows, fp32 activations and a fp32 or bf16 KV cache (ring buffers
        included), eval mode without autograd, outside torch.compile, no reference
        attention (`explain` reads its weights) and no forward hooks anywhere in the model
        (the op runs the whole step without calling modules).
        """
        if (
            kv_cache is None
            or not self.native_decode
            or idx.shape[1] != 1
            or idx.shape[0] > kernels.MAX_ROWS
            or idx.device.type != "cpu"
            or idx.dtype != torch.long
            or kv_cache.k.dtype not in (torch.float32, torch.bfloat16)
            or self.training
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or getattr(self._first_norm_weight(), "dtype", None) != torch.float32
            or any(block._modules["attn"].reference for block in self.h._modules.values())
            or has_hooks(self)
        ):
            return None
        return kernels.decode_step_op()

    def _first_norm_weight(self) -> torch.Tensor | None:
        """The first block's ln_1 weight, read from the modules' own dicts (this runs per
        decode step, after the weights have streamed through the caches: `self.h[0].ln_1`
        through nn.Module's attribute lookups cost ~50 us there)."""
        first = next(iter(self._modules["h"]._modules.values()))
        return _own_tensor(first._modules["ln_1"], "weight")

    def _native_step(
        self, op: Callable[..., torch.Tensor], idx: torch.Tensor, kv_cache: KVCache | SlotKVCache
    ) -> torch.Tensor:
        """`forward` of idx (B, 1) through the cache in one native call: logits (B, V).

        Row b's token sits at position pos[b]; its keys and values go to layer l's part of
        the cache there (a ring buffer's slot pos[b] % band for a ring-buffered layer) and
        it attends to its row's keys up to it: what the eager modules do through the
        cache, which then advances by one.
        """
        cfg, B = self.config, idx.shape[0]
        if isinstance(kv_cache, SlotKVCache):
            pos = kv_cache.lengths[:B]
            self._check_room(kv_cache, int(pos.max()) + 1)
            ring_k = ring_v = kv_cache.k[:0]  # no ring buffers: layer l is k[l]
            slots = list(range(cfg.n_layer))
        else:
            self._check_room(kv_cache, kv_cache.pos + 1)
            pos = torch.full((B,), kv_cache.pos)
            ring_k, ring_v = kv_cache.ring_k, kv_cache.ring_v
            slots = kv_cache.native_slots
        wte, head = self._modules["wte"], self._modules["lm_head"]
        if cfg.positional == "learned":
            table = _own_tensor(self._modules["wpe"], "weight")
        else:
            table = self._buffers["pe"]
        ln_f = self._modules.get("ln_f")
        logits = op(
            idx.view(B), _own_tensor(wte, "weight"), _own_tensor(wte, "scale"),
            math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0, table,
            kv_cache.k, kv_cache.v, ring_k, ring_v, slots, pos,
            [cfg.attn_band_of(i) or 0 for i in range(cfg.n_layer)],
            cfg.n_head, cfg.norm == "post", NATIVE_ACTIVATIONS[cfg.activation], cfg.leaky_slope,
            cfg.layer_norm_eps, [t for block in self.h for t in block.native_tensors()],
            _own_tensor(ln_f, "weight"), _own_tensor(ln_f, "bias"),
            _own_tensor(head, "weight"), _own_tensor(head, "scale"),
        )  # fmt: skip
        if isinstance(kv_cache, SlotKVCache):
            kv_cache.advance(B, 1)
        else:
            kv_cache.advance(1)
        return logits

    def next_logits(
        self, idx: torch.Tensor, kv_cache: KVCache | SlotKVCache | None = None
    ) -> torch.Tensor:
        """Logits (B, V) for the token after idx (B, T): what decoding samples from.

        Only the last position is unembedded: for a long prompt the (B, T, V) logits
        would cost T times the head's compute and memory for nothing. A CPU decode step
        runs as one native op where it applies (`native_step_op`).
        """
        op = self.native_step_op(idx, kv_cache)
        if op is not None:
            return self._native_step(op, idx, kv_cache)
        return self.lm_head(self.hidden_states(idx, kv_cache)[:, -1])

    def hidden_states(
        self, idx: torch.Tensor, kv_cache: KVCache | SlotKVCache | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C): `forward` before the unembedding.

        Generation unembeds only the last position: for a long prompt the (B, T, V) logits
        would cost T times the head's compute and memory for nothing.
        """
        with _attention_backends(idx.device):
            if isinstance(kv_cache, SlotKVCache):
                return self._slot_hidden_states(idx, kv_cache)
            return self._dense_hidden_states(idx, kv_cache)

    def _dense_hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """`hidden_states` without a cache or through a `KVCache` (one position for all rows)."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        self._check_room(kv_cache, start + T)
        # 1. token embedding plus position vector
        x = _lookup(self.wte, idx)  # (B, T, C)
        if self.config.embed_scale:
            x = x * math.sqrt(self.config.d_model)
        if self.config.positional == "learned":
            x = x + _lookup(self.wpe, torch.arange(start, start + T, device=idx.device))
        else:
            x = x + self.pe[start : start + T].to(x.dtype)
        x = self.drop(x)
        # 2. the stack of blocks
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.advance(T)
        # 3. final norm (pre-LN only); `forward` applies the unembedding
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x  # (B, T, C)

    def _slot_hidden_states(self, idx: torch.Tensor, kv_cache: SlotKVCache) -> torch.Tensor:
        """`hidden_states` for rows [0, B) of a `SlotKVCache`, each at its own position."""
        B, T = idx.shape
        pos = kv_cache.positions(B, T)  # (B, T)
        if not kv_cache.static:  # a static cache's caller checks (no value read here)
            self._check_room(kv_cache, int(pos[:, -1].max()) + 1)
        x = self.wte(idx)  # (B, T, C)
        if self.config.embed_scale:
            x = x * math.sqrt(self.config.d_model)
        if self.config.positional == "learned":
            x = x + self.wpe(pos)  # (B, T, C)
        else:
            x = x + self.pe[pos].to(x.dtype)  # (B, T, C)
        x = self.drop(x)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer)
        kv_cache.advance(B, T)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x  # (B, T, C)
