"""Causal self-attention kernels by backend, all computing what `transformer.causal_attention` computes.

Every kernel takes q `[B, T, N, H]`, k/v `[B, T, K, H]` (grouped-query: N a multiple of K) and
returns `[B, T, N, H]`; softmax in fp32 where the kernel allows. Names:

- `reference`: `transformer.causal_attention`, our XLA einsum formulation, tuned for XLA:CPU (block-
  skipping above the diagonal); the choice on CPU and the fallback everywhere;
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on GPU: never
  materialises the `[T, T]` scores. It takes bf16/fp16 with a head dim that is a multiple of 8 (≤ 128,
  or 256 from Hopper on); for anything else cuDNN refuses at trace time and we use `reference`.
  Partitioned by XLA on a mesh (jax gives it sharding rules);
- `splash`: the Pallas splash-attention kernel for TPU (block-sparse causal), for T a multiple of
  `SPLASH_BLOCK`, else `reference`. A Pallas kernel is not partitioned by XLA: on a mesh wrap it with
  `framework.sharding.MeshRules.shard_attention`. `interpret=True` runs it on any backend (tests).

`causal_attention_fn("auto")` picks `cudnn` on GPU, `splash` on TPU and `reference` elsewhere; pass
the kernel as `Transformer.__call__(..., attention=...)` (the model's own default is `reference`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.transformer import causal_attention

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ATTENTION_NAMES: tuple[str, ...] = ("auto", "reference", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention, or `reference` for shapes/dtypes/backends cuDNN does not take."""
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError):
        return causal_attention(q, k, v)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """The Pallas splash kernel (one grouped-query MQA kernel per batch row and kv head), or
    `reference` when T is not a multiple of `SPLASH_BLOCK`."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t % SPLASH_BLOCK:
        return causal_attention(q, k, v)
    kernel = _splash_kernel(t, n // kv_heads, interpret)
    qg = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype)  # splash does not scale
    qg = qg.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, group: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(group)])
    blocks = kernels.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
                                block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK,
                                block_kv_dkv_compute=SPLASH_BLOCK, block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
    with jax.ensure_compile_time_eval():  # its block tables are concrete arrays, cached across traces
        return kernels.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)


def causal_attention_fn(name: str = "auto", backend: str | None = None) -> Attend:
    """The kernel called `name`; `auto` chooses by `backend` (default: jax's default backend)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        name = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn", "tpu": "splash"}.get(backend, "reference")
    kernels: dict[str, Attend] = {"reference": causal_attention, "xla": xla_attention, "cudnn": cudnn_attention,
                                  "splash": splash_attention}
    if name not in kernels:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_NAMES)}, got {name!r}")
    return kernels[name]
