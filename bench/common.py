"""Shared pieces of the benchmarks: the reference Qwen3 config, timing, and the matmul peak.

Every benchmark compares ours with a reference in the same process, alternating repeat by repeat
and keeping the best time of each, because these machines are shared and noisy: the ratio is the
figure that matters, not the absolute time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

QWEN3_BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


class CompileClock:
    """Seconds XLA has spent compiling programs in this process (from `jax.monitoring` events), so a
    benchmark can say how much of a timed stretch went to compiles (seconds each on a GPU)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_: object) -> None:
        if event == self.EVENT:
            with self._lock:
                self.seconds += duration


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function, running them in turn `repeats` times."""
    best = dict.fromkeys(fns, float("inf"))
    for i in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
        log(f"repeat {i}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()) + " (best so far)")
    return best


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a jitted n×n @ n×n matmul on the default device."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    return 2 * n**3 / min(timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats))


def build_qwen3_checkpoint(directory: str, seed: int = 0, config: dict | None = None) -> None:
    """A random Qwen3 checkpoint of `config` (default `QWEN3_BENCH_CONFIG`), written with transformers
    (torch, CPU)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**(config or QWEN3_BENCH_CONFIG))
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
