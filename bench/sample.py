"""Sampling throughput: our engine (KV cache, one jitted while-loop) vs `transformers` `generate`.

Same random Qwen3 weights (`bench/common.py`), 8 prompts × 32 tokens → 128 new tokens each, greedy,
no stop token, so both produce exactly 8 × 128 tokens. Ours is timed through `Engine.sample` (the
path every sampling client takes), on the base model and on a published LoRA snapshot (rank 32,
all targets, non-zero weights) to show what batched adapters cost.

    python bench/sample.py [--prompts 8] [--prompt-len 32] [--new 128] [--repeats 3]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np
import torch
import transformers

from bench.common import alternate_best, build_qwen3_checkpoint, log
from framework.engine import Engine, EngineConfig, SampleJob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as directory:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        engine = Engine(directory, EngineConfig(max_adapters=1, max_rank=32, sampler_slots=1))
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    adapter = engine.create_adapter(rank=32, seed=0)
    weights = engine.adapter_weights(adapter.adapter_id)
    noisy = jax.tree.map(lambda w: w + 0.01 * jax.random.normal(jax.random.key(1), w.shape, w.dtype), weights)
    engine.set_adapter_state(adapter.adapter_id, noisy, None, 0)
    snapshot = engine.publish(adapter.adapter_id)

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, engine.model_config.vocab_size, (args.prompts, args.prompt_len), dtype=np.int32)

    def jobs(snapshot_id: str) -> list[SampleJob]:
        return [SampleJob(snapshot_id=snapshot_id, prompt=p, num_samples=1, max_tokens=args.new, temperature=0.0,
                          top_p=1.0, top_k=-1, seed=i) for i, p in enumerate(prompts)]

    def run_ours(snapshot_id: str = "base"):
        return engine.sample(jobs(snapshot_id))

    def run_torch():
        with torch.inference_mode():
            return torch_model.generate(torch.from_numpy(prompts.astype(np.int64)), max_new_tokens=args.new,
                                        min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)

    log("compiling / warming up")
    ours_out, torch_out = run_ours(), run_torch()
    run_ours(snapshot.snapshot_id)
    ours_tokens = np.array([r.sequences[0].tokens for r in ours_out])
    torch_tokens = torch_out[:, args.prompt_len:].numpy()
    assert ours_tokens.shape == torch_tokens.shape, (ours_tokens.shape, torch_tokens.shape)
    first_divergence = [int(np.argmax(a != b)) if (a != b).any() else len(a)
                        for a, b in zip(ours_tokens, torch_tokens, strict=True)]
    log(f"greedy tokens equal to transformers up to position {first_divergence}")

    best = alternate_best({"ours": run_ours, "ours_lora": lambda: run_ours(snapshot.snapshot_id),
                           "torch": run_torch}, args.repeats)
    n = args.prompts * args.new
    print(json.dumps({
        "bench": "sample", "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new,
        "ours_tokens_per_s": round(n / best["ours"], 1),
        "ours_lora_tokens_per_s": round(n / best["ours_lora"], 1),
        "torch_tokens_per_s": round(n / best["torch"], 1),
        "ratio": round(best["torch"] / best["ours"], 3),
        "ratio_lora": round(best["torch"] / best["ours_lora"], 3),
        "greedy_equal_prefix_min": min(first_divergence),
        "compiles": dict(engine.compile_counts),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
