"""`compute_logprobs` with the prefix cache vs without, on the engine.

On the random 33.6M Qwen3 of `bench/common.py` with a rank-32 adapter, three workloads, each timed
on two engines side by side (the default one, and one with `prefix_cache_mb=0`), alternating:

- `fresh`: 16 sequences of 112 tokens nothing has seen (the cache can only cost here);
- `after_sample`: the 8 sequences just sampled from a 64-token prompt (48 new tokens each), scored
  under the same sampler (their sampled tokens' logprobs are known; the prompt's are not);
- `reference`: the same 8 sequences scored under the base model (a KL penalty's reference pass):
  nothing is known of them under that snapshot, so both engines run the training forward.

Each repeat samples new sequences (a new seed), so the cache never holds a workload's answer
beforehand. Reports the best time of each and the tokens each engine computed.

`sdk_form`: the official SDK's `compute_logprobs` is a one-token sample asking for the prompt's
logprobs; 16 fresh sequences in that form vs the same through `Engine.logprobs`, on the default engine
(target: about 1x: one forward pass either way). `sdk_reference`: the `reference` workload in that
form, the 8 requests submitted together as the SDK's futures arrive (the first computes the shared
prompt, the others only their completions), vs the same 8 through `Engine.logprobs`.

    python -m bench.logprobs [--repeats 4]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable

import numpy as np

from bench.common import build_qwen3_checkpoint, log, timed
from framework.engine import BASE, Engine, EngineConfig, LogprobsRequest, SampleJob

PROMPT_LEN, NEW_TOKENS, SAMPLES, FRESH, FRESH_LEN = 64, 48, 8, 16, 112


def workloads(engine: Engine, snapshot: str) -> dict[str, Callable[[int], list[list[LogprobsRequest]]]]:
    """Per workload: seed → the request batches to time (sampling, when needed, is done here, untimed)."""
    vocab = engine.model_config.vocab_size

    def sampled(seed: int) -> list[np.ndarray]:
        prompt = np.random.default_rng(seed).integers(3, vocab, PROMPT_LEN).astype(np.int32)
        job = SampleJob(snapshot, prompt, SAMPLES, NEW_TOKENS, 1.0, 1.0, -1, seed)
        return [np.concatenate([prompt, np.asarray(s.tokens, np.int32)]) for s in engine.sample([job])[0].sequences]

    def fresh(seed: int) -> list[list[LogprobsRequest]]:
        rng = np.random.default_rng(seed)
        return [[LogprobsRequest(snapshot, rng.integers(3, vocab, FRESH_LEN).astype(np.int32)) for _ in range(FRESH)]]

    return {"fresh": fresh,
            "after_sample": lambda seed: [[LogprobsRequest(snapshot, t) for t in sampled(seed)]],
            "reference": lambda seed: [[LogprobsRequest(BASE, t) for t in sampled(seed)]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        build_qwen3_checkpoint(directory)
        engines = {}
        for name, megabytes in (("cache", EngineConfig.prefix_cache_mb), ("plain", 0.0)):
            engine = Engine(directory, EngineConfig(max_rank=32, prefix_cache_mb=megabytes))
            adapter = engine.create_adapter(rank=32, seed=1)
            engines[name] = (engine, engine.publish(adapter.adapter_id).snapshot_id)
        best: dict[str, dict[str, float]] = {}
        computed: dict[str, dict[str, int]] = {}
        for w, workload in enumerate(("fresh", "after_sample", "reference")):
            for repeat in range(args.repeats + 1):  # repeat 0 warms up (compiles)
                for name, (engine, snapshot) in engines.items():
                    batches = workloads(engine, snapshot)[workload](1000 * repeat + 10 * w)
                    before = engine.metrics()["logprobs"]["computed_tokens"]
                    seconds = timed(lambda e=engine, b=batches: [e.logprobs(batch) for batch in b])
                    if not repeat:
                        continue
                    row = best.setdefault(workload, {})
                    row[name] = min(row.get(name, float("inf")), seconds)
                    # without the cache every token is computed (the scorer, which counts, is not used)
                    everything = sum(len(r.tokens) for batch in batches for r in batch)
                    cached = engine.metrics()["logprobs"]["computed_tokens"] - before
                    computed.setdefault(workload, {})[name] = cached if name == "cache" else everything
            log(f"{workload}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best[workload].items()))
        out_sdk = sdk_form(*engines["cache"], args.repeats)
        out_reference = sdk_reference(*engines["cache"], args.repeats)
    out = {workload: {"cache_ms": round(1e3 * row["cache"], 1), "plain_ms": round(1e3 * row["plain"], 1),
                      "speedup": round(row["plain"] / row["cache"], 2),
                      "tokens_computed_cache": computed[workload]["cache"],
                      "tokens_computed_plain": computed[workload]["plain"]}
           for workload, row in best.items()}
    out["sdk_form"] = out_sdk
    out["sdk_reference"] = out_reference
    print(json.dumps(out))


def sdk_form(engine: Engine, snapshot: str, repeats: int) -> dict[str, float]:
    vocab = engine.model_config.vocab_size

    def requests(repeat: int) -> tuple[list[LogprobsRequest], list[LogprobsRequest]]:
        rng = np.random.default_rng(7000 + repeat)
        prompts = [rng.integers(3, vocab, FRESH_LEN).astype(np.int32) for _ in range(2 * FRESH)]
        return ([LogprobsRequest(snapshot, p) for p in prompts[:FRESH]],
                [LogprobsRequest(snapshot, p) for p in prompts[FRESH:]])

    return compare_sdk_form("sdk_form", engine, requests, repeats)


def sdk_reference(engine: Engine, snapshot: str, repeats: int) -> dict[str, float]:
    sampled = workloads(engine, snapshot)["reference"]
    return compare_sdk_form("sdk_reference", engine,
                            lambda repeat: (sampled(9000 + 2 * repeat)[0], sampled(9001 + 2 * repeat)[0]), repeats)


def compare_sdk_form(name: str, engine: Engine,
                     requests: Callable[[int], tuple[list[LogprobsRequest], list[LogprobsRequest]]],
                     repeats: int) -> dict[str, float]:
    """The first batch of `requests(repeat)` in the SDK's form (submitted together) vs the second (as many,
    alike, but new to the cache) through `Engine.logprobs`; repeat 0 warms up."""
    best = {"sdk_form": float("inf"), "logprobs": float("inf")}
    for repeat in range(repeats + 1):
        sdk, direct = requests(repeat)
        jobs = [SampleJob(r.snapshot_id, r.tokens, 1, 1, 1.0, 1.0, -1, i, prompt_logprobs=True)
                for i, r in enumerate(sdk)]
        seconds = {"sdk_form": timed(lambda j=jobs: engine.sample(j)),
                   "logprobs": timed(lambda r=direct: engine.logprobs(r))}
        if repeat:
            best = {k: min(v, seconds[k]) for k, v in best.items()}
    log(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()))
    return {"sdk_form_ms": round(1e3 * best["sdk_form"], 1), "logprobs_ms": round(1e3 * best["logprobs"], 1),
            "ratio": round(best["sdk_form"] / best["logprobs"], 2)}


if __name__ == "__main__":
    main()
