"""Forward-pass throughput: our jitted Transformer vs the transformers PyTorch model, on CPU.

Builds a random Qwen3 checkpoint (hidden 512, 8 layers, 8 q / 4 kv heads, head_dim 64, MLP 1536,
vocab 8192, untied) with transformers + torch into a temp dir, loads it with `models.load_checkpoint`
(fp32), and times full-logit forwards on the same random token batch for both models, alternating
them repeat by repeat (the machine may be shared): `ratio` is our best time vs torch's best,
`ratio_paired_median` the median over repeats of torch's time / ours in the same repeat. Also
measures the machine's jitted fp32 matmul peak (2048³) and reports our achieved FLOP/s (from
`ModelConfig.flops_per_token`, causal attention counted) as a fraction of it.

    python -m bench.forward [--batch 8] [--seq 256] [--repeats 8]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from bench.common import build_qwen3_checkpoint, log, matmul_peak, timed
from models import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8, help="timed forwards per model (best is kept)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    log(f"jax {jax.__version__} on {jax.devices()}, torch {torch.__version__} with {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as directory:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        ours_model = load_checkpoint(directory, dtype=jnp.float32)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    config = ours_model.config
    log(f"torch attention implementation: {torch_model.config._attn_implementation}")

    graphdef, state = nnx.split(ours_model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    rng = np.random.default_rng(0)
    tokens_np = rng.integers(0, config.vocab_size, (args.batch, args.seq), dtype=np.int32)
    tokens_jax = jnp.asarray(tokens_np)
    tokens_torch = torch.from_numpy(tokens_np.astype(np.int64))

    def run_ours():
        return forward(state, tokens_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return torch_model(tokens_torch).logits

    log("compiling / warming up")
    for _ in range(args.warmup):
        ours_logits = run_ours()
        torch_logits = run_torch()
    max_abs_diff = float(np.abs(np.asarray(ours_logits) - torch_logits.numpy()).max())
    log(f"max |logits ours - torch| = {max_abs_diff:.3g}")
    if not max_abs_diff < 1e-3:
        raise SystemExit(f"logits mismatch: max abs diff {max_abs_diff} >= 1e-3")

    ours_times, torch_times = [], []
    for i in range(args.repeats):  # alternate, so load from other processes hits both alike
        first, second = (run_ours, run_torch) if i % 2 == 0 else (run_torch, run_ours)
        times = {first: timed(first), second: timed(second)}
        ours_times.append(times[run_ours])
        torch_times.append(times[run_torch])
        log(f"repeat {i}: ours {ours_times[-1] * 1e3:.1f} ms, torch {torch_times[-1] * 1e3:.1f} ms")
    ours_best, torch_best = min(ours_times), min(torch_times)
    paired = statistics.median(t / o for o, t in zip(ours_times, torch_times, strict=True))

    n_tokens = args.batch * args.seq
    ours_tps, torch_tps = n_tokens / ours_best, n_tokens / torch_best
    ours_flops = config.flops_per_token(args.seq) * ours_tps
    log("measuring fp32 matmul peak (2048³)")
    peak = matmul_peak()
    print(json.dumps({
        "bench": "forward",
        "batch": args.batch,
        "seq": args.seq,
        "ours_tokens_per_s": round(ours_tps, 1),
        "torch_tokens_per_s": round(torch_tps, 1),
        "ratio": round(ours_tps / torch_tps, 3),
        "ratio_paired_median": round(paired, 3),
        "ours_flops": round(ours_flops),
        "matmul_peak_flops": round(peak),
        "fraction_of_peak": round(ours_flops / peak, 3),
        "max_abs_logit_diff": max_abs_diff,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
