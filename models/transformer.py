"""The decoder-only transformer (Llama 3 / Qwen2 / Qwen3 family) as a Flax NNX module.

How it departs from the textbook model, and why:
- Every projection is a `Linear` with a `[d_in, d_out]` kernel, and every call site passes its
  output through an optional `LinearHook(layer, target, x, y) -> y'`. That hook is the only way
  adapters (LoRA, in `lora/`) reach the model, so this module knows nothing of adapter banks.
  Target names: q, k, v, o, gate, up, down (layer index 0..L-1) and unembed (layer -1).
- Batches are right-padded. Under a causal mask a valid position never sees a pad to its right,
  so the full forward needs no padding mask: outputs at pad positions are finite garbage that
  callers drop. Positions default to 0..T-1 per row.
- Norms, rope, softmax and logits run in fp32 whatever the parameter dtype; the residual stream
  stays in the parameter dtype (as transformers does), so bf16 models stay bf16 between layers.
- The same attention code serves the full forward and cached decoding (`kv_cache.py`): it takes
  keys/values and a boolean mask, and the caller decides where they come from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig, rope_inverse_frequencies
from models.remat import checkpointed

LinearHook = Callable[[int, str, jax.Array, jax.Array], jax.Array]
"""`hook(layer, target, x, y)` returns the projection output to use instead of `y = Linear(x)`.

`layer` is the decoder layer index (-1 for the unembedding), `target` one of `TARGETS`,
`x` the projection input `[..., d_in]` and `y` the frozen projection's output `[..., d_out]`.
"""

TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "unembed")
UNEMBED_LAYER = -1


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)` with a `[d_in, d_out]` kernel."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the scale (as transformers)."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, H/2]` (fp32) for integer `positions [B, T]`."""
    inv_freq = jnp.asarray(np.asarray(rope_inverse_frequencies(config), np.float32))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return _materialize(jnp.cos(angles)), _materialize(jnp.sin(angles))


def _materialize(table: jax.Array) -> jax.Array:
    """`table`, computed once into a buffer instead of being recomputed inside every consumer.

    XLA fuses elementwise producers into their consumers, so cos/sin of `[B, T, H/2]` would be
    recomputed for every head, in q and k, in every layer (x16 per layer here: ~8% of a CPU forward).
    `optimization_barrier` does not survive XLA:CPU's pipeline; a dot does not fuse into its
    consumers, and a dot with the identity is exact (each output is one product by 1.0).
    """
    return jnp.einsum("...i,ij->...j", table, jnp.eye(table.shape[-1], dtype=table.dtype))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, heads, H]` by the half-split convention of transformers (`rotate_half`)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q `[B, T, N, H]`, k/v `[B, S, K, H]`, mask `[B, T, S]` (True = may attend) -> `[B, T, N, H]`.
    Scores and softmax in fp32.
    """
    qg, kt, vt = _head_major(q, k, v)
    return _from_head_major(_attend_head_major(qg, kt, vt, mask))


def attention_to_head_major_kv(q: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` with keys/values already head-major, `[B, K, S, H]` (the KV cache's layout), so a
    decode step reads the cache as it lies instead of transposing all of it in every layer."""
    return _from_head_major(_attend_head_major(_group_queries(q, kt.shape[1]), kt, vt, mask))


def _head_major(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[B, T, N, H]` -> `[B, K, G, T, H]` (G = N/K), k/v `[B, S, K, H]` -> `[B, K, S, H]`.

    Both attention matmuls then run as plain batched GEMMs over (B, K) and the softmax fuses into the
    second one; these transposes fuse into the rope that produces q and k. (Einsums in the
    `[B, T, N, H]` order made XLA transpose the `[T, S]` scores, twice per layer.)
    """
    return _group_queries(q, k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q `[B, T, N, H]` -> `[B, K, G, T, H]`: the G = N/K query heads that share each key/value head."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _from_head_major(out: jax.Array) -> jax.Array:
    """`[B, K, G, T, H]` -> `[B, T, N, H]`."""
    b, kv_heads, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


def _attend_head_major(qg: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention on `_head_major` operands; mask `[B, T, S]` -> `[B, K, G, T, H]`."""
    h = qg.shape[-1]
    scores = jnp.einsum("bkgth,bksh->bkgts", qg, kt, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores * (h**-0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(vt.dtype)
    return jnp.einsum("bkgts,bksh->bkgth", probs, vt)


CAUSAL_BLOCK = 128
"""Query block of `causal_attention`: blocks above the diagonal are skipped, not masked."""


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = CAUSAL_BLOCK,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention (`S == T`), the same numbers as `attention(q, k, v, causal_mask(T))`.

    Queries are split into blocks of `block` rows and each block attends only to the keys up to
    its last row, so the scores above the diagonal blocks are never computed: with T = n·block
    this does (n+1)/2n of the dense work (75% at T = 2·block). With `segment_ids [B, T]` (several
    sequences packed in a row), a position attends only to earlier positions of its own segment.
    """
    t = q.shape[1]
    same = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    if t <= block:
        return attention(q, k, v, causal_mask(t) if same is None else causal_mask(t) & same)
    qg, kt, vt = _head_major(q, k, v)
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        rows = (jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :])[None]
        if same is not None:
            rows = rows & same[:, start:stop, :stop]
        outs.append(_attend_head_major(qg[:, :, :, start:stop], kt[:, :, :stop], vt[:, :, :stop], rows))
    return _from_head_major(jnp.concatenate(outs, axis=3))


def causal_mask(t: int) -> jax.Array:
    """`[1, T, T]` lower-triangular mask."""
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None]


def _hooked(hook: LinearHook | None, layer: int, target: str, linear: Linear, x: jax.Array) -> jax.Array:
    y = linear(x)
    return y if hook is None else hook(layer, target, x, y)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.layer = layer
        self.q_proj = Linear(d, config.q_size, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, config.kv_size, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, config.kv_size, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(config.q_size, d, bias=config.o_bias, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, hook: LinearHook | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, N, H]`, k/v `[B, T, K, H]` for `x [B, T, D]`, rope applied to q and k."""
        c = self.config
        b, t, _ = x.shape
        q = _hooked(hook, self.layer, "q", self.q_proj, x).reshape(b, t, c.num_heads, c.head_dim)
        k = _hooked(hook, self.layer, "k", self.k_proj, x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = _hooked(hook, self.layer, "v", self.v_proj, x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attn: jax.Array, hook: LinearHook | None) -> jax.Array:
        b, t = attn.shape[:2]
        return _hooked(hook, self.layer, "o", self.o_proj, attn.reshape(b, t, self.config.q_size))


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.layer = layer
        self.gate_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, hook: LinearHook | None) -> jax.Array:
        gate = _hooked(hook, self.layer, "gate", self.gate_proj, x)
        up = _hooked(hook, self.layer, "up", self.up_proj, x)
        return _hooked(hook, self.layer, "down", self.down_proj, jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.attn = Attention(config, layer, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = MLP(config, layer, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
        hook: LinearHook | None,
    ) -> jax.Array:
        """One pre-norm block. `attend(q, k, v)` does the attention (and any cache bookkeeping)."""
        q, k, v = self.attn.project_qkv(self.input_norm(x), cos, sin, hook)
        x = x + self.attn.output(attend(q, k, v), hook)
        return x + self.mlp(self.post_attn_norm(x), hook)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` gives fp32 logits `[B, T, V]`."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        init = jax.nn.initializers.normal(stddev=0.02)
        self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)]
        )
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:  # stored [V, D] like the embedding, so tied and untied share one code path
            self.lm_head = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))

    def unembedding(self) -> jax.Array:
        """`[V, D]` output embedding (the input embedding when tied)."""
        return (self.embed if self.lm_head is None else self.lm_head)[...]

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        hook: LinearHook | None = None,
        attend_fns: list[Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] | None = None,
        segment_ids: jax.Array | None = None,
        remat: str = "none",
        attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Final-normed hidden states `[B, T, D]` for `tokens [B, T]`.

        `attend_fns[i]` replaces plain causal self-attention in layer i (the KV cache uses this).
        `segment_ids [B, T]` keeps packed sequences apart (pass their restarting `positions` too).
        `remat` names the rematerialisation policy of every layer (`models.remat`); `attention`
        replaces `causal_attention` (e.g. an accelerator kernel from `models.fused_attention`; not
        with `segment_ids`, which only the masked path takes).
        """
        if remat != "none" and attend_fns is not None:  # their cache bookkeeping would leak out of jax.checkpoint
            raise ValueError("remat applies to training forwards, not with attend_fns (KV-cache passes)")
        if segment_ids is not None and attention is not None:
            raise ValueError("packed rows (segment_ids) need the masked attention path; pass attention=None")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_tables(self.config, positions)
        x = jnp.take(self.embed[...], tokens, axis=0)

        def self_attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return causal_attention(q, k, v, segment_ids=segment_ids)

        for i, layer in enumerate(self.layers):
            attend = attend_fns[i] if attend_fns is not None else attention or self_attend
            x = checkpointed(functools.partial(layer, attend=attend, hook=hook), remat)(x, cos, sin)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array, *, hook: LinearHook | None = None) -> jax.Array:
        """fp32 logits `[..., V]` from hidden states `[..., D]`."""
        y = jnp.einsum("...d,vd->...v", hidden, self.unembedding(), preferred_element_type=jnp.float32)
        if hook is not None:
            y = hook(UNEMBED_LAYER, "unembed", hidden, y).astype(jnp.float32)
        return y

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, *, hook: LinearHook | None = None,
        segment_ids: jax.Array | None = None, remat: str = "none",
        attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        hidden = self.hidden_states(tokens, positions, hook=hook, segment_ids=segment_ids, remat=remat,
                                    attention=attention)
        return self.logits(hidden, hook=hook)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) `[B, T]` from logits `[B, T, V]` (fp32)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logz
