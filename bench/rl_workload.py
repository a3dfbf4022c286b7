"""An RL workload of many tenants, with the engine's serving features on vs off.

8 tenants (threads) on one engine over the random 33.6M Qwen3 of `bench/common.py`, LoRA rank 32.
Each runs RL iterations through the client API:
- publish its current weights (`save_weights_and_get_sampling_client`);
- turn 1: G = 8 completions (48 new tokens) of its 64-token prompt;
- turns 2-4: each rollout continues: the next prompt is the previous prompt + its completion + 8
  new "user" tokens, one completion each (the 8 rollouts submitted together);
- train on the 8 final conversations (importance_sampling with the sampled logprobs) + optim_step.

"on" is the default engine: continuous batching, one prefill per request, the prefix cache and
packed training rows. "off" turns all four off (batch-synchronous decoding, a prefill per sampled
row, no cache, one row per sequence). `--warmup` iterations (compiling what they meet), then
`--iterations` timed ones; the median of the tenants' timed iterations is reported beside the wall time.
Reports the speed-up, the share of an iteration spent publishing, prefilled vs cached prompt
tokens and the training padding fraction, and the seconds the timed iterations spent compiling
programs the warm-up did not meet (seconds each on a GPU) with the speed-up without them.

    python -m bench.rl_workload [--tenants 8] [--iterations 4] [--warmup 2]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time

import numpy as np

from bench.common import CompileClock, build_qwen3_checkpoint, log
from framework import ServiceClient, types
from framework.engine import EngineConfig

G, PROMPT_LEN, NEW_TOKENS, USER_TOKENS, TURNS = 8, 64, 48, 8, 4
COMPILES = CompileClock()


def tenant_loop(service: ServiceClient, directory: str, seed: int, iterations: int, warmup: int,
                barrier: threading.Barrier, out: dict) -> None:
    trainer = service.create_lora_training_client(directory, rank=32, seed=seed)
    vocab = trainer._engine.model_config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, PROMPT_LEN).tolist()
    params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, stop=[])
    publish_seconds, iteration_seconds = [], []
    for it in range(warmup + iterations):
        if it == warmup:
            barrier.wait()  # everyone warmed up: time from here
        t0 = time.perf_counter()
        sampler = trainer.save_weights_and_get_sampling_client()
        publish_seconds.append(time.perf_counter() - t0)
        first = sampler.sample(types.ModelInput.from_ints(prompt), G,
                               params.model_copy(update={"seed": seed * 1000 + it})).result()
        conversations = [prompt + s.tokens for s in first.sequences]
        logprobs = [[0.0] * PROMPT_LEN + s.logprobs for s in first.sequences]
        for turn in range(1, TURNS):
            user = [rng.integers(3, vocab, USER_TOKENS).tolist() for _ in range(G)]
            futures = [sampler.sample(types.ModelInput.from_ints(c + u), 1,
                                      params.model_copy(update={"seed": seed * 1000 + it * 10 + turn + 100 * g}))
                       for g, (c, u) in enumerate(zip(conversations, user, strict=True))]
            for g, f in enumerate(futures):
                s = f.result().sequences[0]
                conversations[g] = conversations[g] + user[g] + s.tokens
                logprobs[g] = logprobs[g] + [0.0] * USER_TOKENS + s.logprobs
        rewards = rng.normal(size=G)
        data = []
        for conv, lps, r in zip(conversations, logprobs, rewards - rewards.mean(), strict=True):
            n = len(conv) - 1
            data.append(types.Datum(model_input=types.ModelInput.from_ints(conv[:-1]), loss_fn_inputs={
                "target_tokens": np.asarray(conv[1:]), "logprobs": np.asarray(lps[1:], np.float32),
                "advantages": np.full(n, r, np.float32)}))
        trainer.forward_backward(data, "importance_sampling").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        iteration_seconds.append(time.perf_counter() - t0)
        if seed == 0:
            log(f"tenant 0: iteration {it} ({'warm-up' if it < warmup else 'timed'}) {iteration_seconds[-1]:.2f} s")
    out[seed] = {"publish": publish_seconds[warmup:], "iteration": iteration_seconds[warmup:]}


def run(directory: str, home: str, config: EngineConfig, tenants: int, iterations: int, warmup: int) -> dict:
    with ServiceClient(engine_config=config, home=home) as service:
        out: dict = {}
        barrier = threading.Barrier(tenants + 1)
        threads = [threading.Thread(target=tenant_loop, args=(service, directory, s, iterations, warmup, barrier, out))
                   for s in range(tenants)]
        for t in threads:
            t.start()
        barrier.wait()
        engine = service._runtime.engines()[0][0]
        warm = dict(engine.compile_counts)
        log(f"warmed up: {sum(warm.values())} compiles {warm}")
        before = engine.metrics()
        t0, compiling = time.perf_counter(), COMPILES.seconds
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        compile_seconds = COMPILES.seconds - compiling
        after = engine.metrics()
    publish = sum(sum(v["publish"]) for v in out.values())
    iteration = sum(sum(v["iteration"]) for v in out.values())
    sampling = {k: after["sampling"][k] - before["sampling"][k] for k in ("prefill_tokens", "cached_prompt_tokens")}
    per_iteration = sorted(x for v in out.values() for x in v["iteration"])
    # Compiles run on the engine's one worker thread, holding up every tenant: the timed stretch less its
    # compile seconds estimates the steady state (what warm programs would give).
    return {"seconds": round(wall, 2), "compile_seconds": round(compile_seconds, 2),
            "seconds_without_compiles": round(wall - compile_seconds, 2),
            "median_iteration_seconds": round(float(np.median(per_iteration)), 2),
            "publish_share": round(publish / iteration, 4),
            "prefilled_prompt_tokens": sampling["prefill_tokens"],
            "cached_prompt_tokens": sampling["cached_prompt_tokens"],
            "padding_fraction": round(after["training"]["padding_fraction"], 3),
            "sampling_batch_fill": round(after["sampling"]["batch_fill"], 3),
            "new_compiles_after_warmup": {k: v - warm.get(k, 0) for k, v in engine.compile_counts.items()
                                          if v != warm.get(k, 0)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    configs = {"on": EngineConfig(max_rank=32),
               "off": EngineConfig(max_rank=32, continuous_batching=False, prefill_once=False, prefix_cache_mb=0,
                                   pack=False)}
    result: dict = {"bench": "rl_workload", "tenants": args.tenants, "iterations": args.iterations,
                    "warmup": args.warmup, "G": G,
                    "turns": TURNS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS}
    with tempfile.TemporaryDirectory() as directory:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        for name, config in configs.items():
            with tempfile.TemporaryDirectory() as home:
                log(f"features {name}")
                result[name] = run(directory, home, config, args.tenants, args.iterations, args.warmup)
                log(f"features {name}: {result[name]}")
    result["speedup"] = round(result["off"]["seconds"] / result["on"]["seconds"], 2)
    result["speedup_without_compiles"] = round(result["off"]["seconds_without_compiles"]
                                               / result["on"]["seconds_without_compiles"], 2)
    result["speedup_median_iteration"] = round(result["off"]["median_iteration_seconds"]
                                               / result["on"]["median_iteration_seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
