"""`EngineConfig`: the sizes of one engine's caches and batches. Every field is a bound that keeps a
long-running engine's memory and compile count flat, never a limit a user's workload runs into:
adapters beyond `max_adapters` page to host memory, snapshots beyond `sampler_slots` wait for a
slot, sampled rows beyond `decode_rows` wait for a row. `mesh` spreads the engine over devices
(`framework.sharding`).
"""

from __future__ import annotations

import dataclasses

from framework.sharding import MeshConfig
from lora import ALL_TARGETS
from models.fused_attention import ATTENTION_NAMES
from models.remat import REMAT_NAMES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_adapters: int = 8  # training adapters resident on the device; the least recently used page to host
    max_rank: int = 32
    sampler_slots: int = 8  # published snapshots resident in the sampler bank at once
    targets: tuple[str, ...] = ALL_TARGETS  # LoRA targets an adapter may train
    dtype: str = "float32"  # base and adapter parameter dtype
    min_seq_bucket: int = 32
    max_seq_len: int = 0  # 0 = the model's max_position_embeddings
    # Tokens in one training batch: requests beyond it run in the next batch; a request that alone exceeds
    # it runs alone. Past ~2048 tokens a step gains nothing from more rows on a 2-core CPU and loses to the
    # larger activations: four tenants' 8 x 256 batches co-batched two by two (4096) ran at 0.78-0.91x one
    # alone, each alone (2048) at 0.98-1.03x. An accelerator wants more: raise it there.
    max_batch_tokens: int = 2048
    batch_window_ms: float = 5.0  # an idle engine waits this long for a burst of requests to batch together
    max_optim_batch: int = 8  # optim_steps of different adapters applied in one compiled call
    pack: bool = True  # pack short training sequences into shared rows when that saves padding
    pack_across_adapters: bool = True  # ... and let a row hold several adapters' sequences (packing.layout)
    decode_rows: int = 64  # sequences decoding at once (the KV-cache row pool)
    decode_chunk: int = 8  # decode steps per engine call; waiting requests join between chunks
    # The smallest decode pool (rows) and prefill batch (prompts x tokens). Padding up to these costs an
    # accelerator next to nothing (a step of a few rows reads the weights once whatever their number) and
    # saves a compiled program per smaller size, seconds of compile each there; on a CPU every padded row
    # costs its compute (8 rows decode at 2.7x the time of 1 there). 0 = by backend: 8 rows and 128 tokens
    # on an accelerator, no floor on CPU.
    min_decode_rows: int = 0
    min_prefill_tokens: int = 0
    prefix_cache_mb: float = 256.0  # KV of recent prompts per snapshot (LRU); 0 turns the prefix cache off
    custom_steps: int = 16  # compiled custom-loss steps kept (LRU)
    # Off only to measure what they save (bench/rl_workload.py): batch-synchronous decoding, and a
    # prefill per sampled row instead of one per request.
    continuous_batching: bool = True
    prefill_once: bool = True
    remat: str = "none"  # rematerialisation of each layer in training steps: none | full | dots (models.remat)
    # Attention kernel for training and forward passes: auto = cuDNN flash on GPU, Pallas splash on TPU,
    # the reference XLA path on CPU (models.fused_attention); packed rows always take the masked path.
    attention: str = "auto"
    # The device mesh: by default every visible device along `fsdp` (one device: no sharding at all).
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        # A one-token bucket would only add a compiled shape: every training row has an input and a target.
        if self.min_seq_bucket < 2:
            raise ValueError(f"min_seq_bucket must be >= 2, got {self.min_seq_bucket}")
        for name in ("max_adapters", "max_rank", "sampler_slots", "max_optim_batch", "decode_rows", "decode_chunk",
                     "custom_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens < self.min_seq_bucket:
            raise ValueError(f"max_batch_tokens must be >= min_seq_bucket ({self.min_seq_bucket}), "
                             f"got {self.max_batch_tokens}")
        if self.remat not in REMAT_NAMES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_NAMES)}, got {self.remat!r}")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_NAMES)}, got {self.attention!r}")
        for name in ("min_decode_rows", "min_prefill_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: by backend), got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
