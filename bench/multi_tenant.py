"""Multi-tenant serving: N tenants' requests batched by the engine vs the same requests one at a time,
what a step costs as the engine's adapter capacity grows, and what paging an adapter back costs.

All on the random 33.6M Qwen3 of `bench/common.py`, LoRA rank 32 on every linear layer, through the
public client API (the scheduler batches what is submitted together):

1. small requests, N = 1, 2, 4, 8, 16, 32 tenants on default settings (8 adapters on the device, 8
   sampler slots: N > 8 pages adapters in and out and waits for sampler slots):
   - sampling: each tenant 1 prompt of 32 tokens → 64 new tokens, all submitted then awaited, vs
     each awaited before the next is submitted;
   - training: each tenant one 64-token sequence (forward_backward + optim_step), likewise.
   Every shape is warmed up first; new compiles during the timed runs are reported (target: none), and
   so are the adapters a training round pages in (a batch fills with resident adapters first).
   The one-at-a-time runs go with the scheduler's batch window off: a lone request has no burst to wait
   for, so the baseline does not pay that wait.
2. large requests: each tenant a batch of 8 × 256; N = 4 tenants' aggregate vs one tenant alone.
3. ragged requests: 8 tenants in one burst, one training a 256-token sequence and seven a 32-token one
   each: rows that mix adapters' sequences (2 rows of 256) vs one adapter per row (8 rows).
4. capacity: one adapter's step (4 × 128 tokens) on engines holding 8, 32 and 128 resident adapters,
   each in its own process: the best and median step over at least 2 s of steps (hundreds on an
   accelerator), and peak memory, host and (on an accelerator) device (targets: within 10% of each other);
   with `--trace-steps N`, each capacity's first process also profiles N steps and reports the events
   that took the most time per step, on the host and on each device.
5. paging: the mean time to page an rank-32 adapter (weights, AdamW moments, gradients) back in.

    python -m bench.multi_tenant [--tenants 1,2,4,8,16,32] [--repeats 3]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from bench.common import alternate_best, build_qwen3_checkpoint, log
from framework import ServiceClient, types
from framework.engine import EngineConfig

PROMPT_LEN, NEW_TOKENS, TRAIN_SEQ = 32, 64, 64
ADAM = types.AdamParams(learning_rate=1e-4)
MIN_TIMED_S = 2.0  # the capacity part times at least this much of steps per engine


def make_data(rng: np.random.Generator, vocab: int, rows: int, seq: int) -> list[types.Datum]:
    out = []
    for _ in range(rows):
        ids = rng.integers(3, vocab, seq + 1)
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(seq, np.float32)}))
    return out


def without_batch_window(service: ServiceClient, directory: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Wraps a one-at-a-time run so that it runs with the scheduler's batch window off: a request alone has no
    burst to wait for, and the baseline should not pay the wait (up to `batch_window_ms` per request)."""
    _, scheduler = service._runtime.get(directory)

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            window, scheduler.batch_window_s = scheduler.batch_window_s, 0.0
            try:
                fn()
            finally:
                scheduler.batch_window_s = window
        return run
    return wrap


def page_ins_of(engine, fn: Callable[[], None]) -> int:
    """Adapters paged in while `fn` runs (one round of every tenant's requests)."""
    before = engine.metrics()["adapters"]["page_ins"]
    fn()
    return engine.metrics()["adapters"]["page_ins"] - before


def small_requests(directory: str, home: str, counts: list[int], repeats: int) -> dict:
    out: dict = {}
    with ServiceClient(home=home) as service:
        n_max = max(counts)
        clients = [service.create_lora_training_client(directory, rank=32, seed=i) for i in range(n_max)]
        engine = clients[0]._engine
        windowless = without_batch_window(service, directory)
        vocab = engine.model_config.vocab_size
        rng = np.random.default_rng(0)
        data = [make_data(rng, vocab, 1, TRAIN_SEQ) for _ in range(n_max)]
        prompts = [types.ModelInput.from_ints(rng.integers(3, vocab, PROMPT_LEN).tolist()) for _ in range(n_max)]
        params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=0, stop=[])
        for c, d in zip(clients, data, strict=True):  # non-zero adapters
            c.forward_backward(d, "cross_entropy")
            c.optim_step(ADAM)
        samplers = [c.save_weights_and_get_sampling_client() for c in clients]

        for n in counts:
            cs, ds, ss, ps = clients[:n], data[:n], samplers[:n], prompts[:n]

            def train_alone(cs=cs, ds=ds) -> None:
                for c, d in zip(cs, ds, strict=True):
                    c.forward_backward(d, "cross_entropy").result()
                    c.optim_step(ADAM).result()

            def train_together(cs=cs, ds=ds) -> None:
                futures = [(c.forward_backward(d, "cross_entropy"), c.optim_step(ADAM)) for c, d in zip(cs, ds,
                                                                                                         strict=True)]
                for fb, opt in futures:
                    fb.result(), opt.result()

            def sample_alone(ss=ss, ps=ps) -> None:
                for s, p in zip(ss, ps, strict=True):
                    s.sample(p, 1, params).result()

            def sample_together(ss=ss, ps=ps) -> None:
                for f in [s.sample(p, 1, params) for s, p in zip(ss, ps, strict=True)]:
                    f.result()

            log(f"N={n}: warming up")
            for fn in (train_alone, train_together, sample_alone, sample_together) * 2:  # both orders: the
                fn()  # decode pool's shape after a run depends on the run before it
            warm = dict(engine.compile_counts)
            train = alternate_best({"alone": windowless(train_alone), "together": train_together}, repeats)
            sample = alternate_best({"alone": windowless(sample_alone), "together": sample_together}, repeats)
            compiles = {k: v - warm.get(k, 0) for k, v in engine.compile_counts.items() if v != warm.get(k, 0)}
            pages = {name: page_ins_of(engine, fn) for name, fn in (("alone", train_alone),
                                                                    ("together", train_together))}
            out[n] = {
                "train_tokens_per_s_alone": round(n * TRAIN_SEQ / train["alone"], 1),
                "train_tokens_per_s_together": round(n * TRAIN_SEQ / train["together"], 1),
                "train_ratio": round(train["alone"] / train["together"], 2),
                "sample_tokens_per_s_alone": round(n * NEW_TOKENS / sample["alone"], 1),
                "sample_tokens_per_s_together": round(n * NEW_TOKENS / sample["together"], 1),
                "sample_ratio": round(sample["alone"] / sample["together"], 2),
                "new_compiles_after_warmup": compiles,
                "train_page_ins_alone": pages["alone"], "train_page_ins_together": pages["together"],
            }
            log(f"N={n}: {out[n]}")
        adapters = engine.metrics()["adapters"]
    return {"by_tenants": out, "page_in_ms_mean": round(1e3 * adapters["page_in_seconds_mean"], 2),
            "page_ins": adapters["page_ins"]}


def large_requests(directory: str, home: str, repeats: int) -> dict:
    with ServiceClient(home=home) as service:
        clients = [service.create_lora_training_client(directory, rank=32, seed=i) for i in range(4)]
        vocab = clients[0]._engine.model_config.vocab_size
        rng = np.random.default_rng(1)
        data = [make_data(rng, vocab, 8, 256) for _ in clients]

        def run(n: int) -> None:
            futures = [(c.forward_backward(d, "cross_entropy"), c.optim_step(ADAM))
                       for c, d in zip(clients[:n], data[:n], strict=True)]
            for fb, opt in futures:
                fb.result(), opt.result()

        run(1), run(4)
        best = alternate_best({"one": without_batch_window(service, directory)(lambda: run(1)),
                               "four": lambda: run(4)}, repeats)
    return {"one_tenant_tokens_per_s": round(8 * 256 / best["one"], 1),
            "four_tenants_tokens_per_s": round(4 * 8 * 256 / best["four"], 1),
            "ratio": round(4 * best["one"] / best["four"], 2)}


def ragged_requests(directory: str, home: str, repeats: int) -> dict:
    with ServiceClient(home=home) as service:
        clients = [service.create_lora_training_client(directory, rank=32, seed=i) for i in range(8)]
        engine, _ = service._runtime.get(directory)
        vocab = engine.model_config.vocab_size
        rng = np.random.default_rng(3)
        data = [make_data(rng, vocab, 1, 256)] + [make_data(rng, vocab, 1, 32) for _ in clients[1:]]

        def run() -> None:
            futures = [(c.forward_backward(d, "cross_entropy"), c.optim_step(ADAM))
                       for c, d in zip(clients, data, strict=True)]
            for fb, opt in futures:
                fb.result(), opt.result()

        def one_adapter_per_row() -> None:
            mixing, engine.config = engine.config, dataclasses.replace(engine.config, pack_across_adapters=False)
            try:
                run()
            finally:
                engine.config = mixing

        run(), one_adapter_per_row()
        before = engine.metrics()["training"]
        best = alternate_best({"mixed": run, "one_adapter_per_row": one_adapter_per_row}, repeats)
        after = engine.metrics()["training"]
    tokens = 256 + 7 * 32
    return {"mixed_tokens_per_s": round(tokens / best["mixed"], 1),
            "one_adapter_per_row_tokens_per_s": round(tokens / best["one_adapter_per_row"], 1),
            "ratio": round(best["one_adapter_per_row"] / best["mixed"], 2),
            "mixed_batches": after["mixed_batches"] - before["mixed_batches"],
            "batches": after["batches"] - before["batches"]}


def capacity_child(directory: str, capacity: int, repeats: int, trace_steps: int = 0) -> None:
    """In a fresh process: an engine holding `capacity` resident adapters, one of them stepping."""
    from framework.engine import DatumArrays, Engine, ForwardRequest, OptimRequest
    from framework.optim import AdamHyperparams

    engine = Engine(directory, EngineConfig(max_adapters=capacity, max_rank=32))
    ids = [engine.create_adapter(rank=32, seed=i).adapter_id for i in range(capacity)]
    rng = np.random.default_rng(2)
    tokens = rng.integers(3, engine.model_config.vocab_size, (4, 129)).astype(np.int32)
    datums = [DatumArrays(t[:-1], {"target_tokens": t[1:], "weights": np.ones(128, np.float32)}) for t in tokens]
    hp = AdamHyperparams.make(1e-4)

    def step() -> None:
        engine.forward([ForwardRequest(ids[0], datums, "cross_entropy")], backward=True)
        engine.optim_step([OptimRequest(ids[0], hp)])

    for _ in range(3):  # compiles, then lets an accelerator settle (autotuning, clocks)
        step()
    times: list[float] = []
    # At least `repeats` steps and MIN_TIMED_S of them: a step of a few ms on an accelerator needs hundreds
    # for a minimum that holds to a few percent (three gave 8.3 / 9.4 / 10.1 ms on an H200).
    while len(times) < repeats or sum(times) < MIN_TIMED_S:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    trace = None
    if trace_steps:  # a profile of a few steps, for finding what a step's cost depends on
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(trace_steps):
                    step()
            trace = summarize_trace(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0],
                                    trace_steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"capacity": capacity, "step_ms": round(1e3 * min(times), 2),
           "median_step_ms": round(1e3 * float(np.median(times)), 2), "steps": len(times),
           "peak_rss_mb": round(peak_mb)}
    device_stats = jax.local_devices()[0].memory_stats()  # None on CPU, where the host figure is the device's
    if device_stats:
        row["peak_device_mb"] = round(device_stats.get("peak_bytes_in_use", 0) / 2**20)
    if trace is not None:
        row["trace"] = trace
    print(json.dumps(row))


def summarize_trace(path: str, steps: int, top: int = 12) -> dict:
    """A profile reduced to what fits in the bench's JSON: per profiled process (the host, each device),
    the `top` events by total time, in microseconds per step, with their counts per step."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    total: dict[tuple[str, str], float] = collections.Counter()
    count: dict[tuple[str, str], int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            key = (names.get(e["pid"], str(e["pid"])), e["name"])
            total[key] += e.get("dur", 0.0)
            count[key] += 1
    out: dict[str, list] = {}
    for (process, name), us in sorted(total.items(), key=lambda kv: -kv[1]):
        if len(out.setdefault(process, [])) < top:
            out[process].append([name, round(us / steps, 1), round(count[(process, name)] / steps, 2)])
    return out


def capacity(directory: str, repeats: int, rounds: int, trace_steps: int) -> dict:
    """Each capacity in its own process, `rounds` times in alternating order (8, 32, 128, 128, 32, 8, ...:
    a machine that drifts, warming up or throttling, favours none); each capacity's fastest process."""
    rows: dict[int, dict] = {}
    traces: dict[int, dict] = {}
    for r in range(rounds):
        for cap in (8, 32, 128)[:: 1 if r % 2 == 0 else -1]:
            log(f"capacity {cap}: own process (round {r + 1} of {rounds})")
            out = subprocess.run([sys.executable, "-m", "bench.multi_tenant", "--capacity-child", str(cap),
                                  "--checkpoint", directory, "--repeats", str(repeats),
                                  "--trace-steps", str(trace_steps if r == 0 else 0)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if "trace" in row:
                traces[cap] = row.pop("trace")
            log(f"capacity {cap}: {row}")
            if cap not in rows or row["step_ms"] < rows[cap]["step_ms"]:
                rows[cap] = row
    rows = {cap: {**rows[cap], **({"trace": traces[cap]} if cap in traces else {})} for cap in sorted(rows)}
    def spread(key: str) -> float:
        return round(max(r[key] for r in rows.values()) / min(r[key] for r in rows.values()), 3)

    return {"rows": rows, "step_ms_max_over_min": spread("step_ms"),
            "median_step_ms_max_over_min": spread("median_step_ms"), "step_ms_at_8": rows[8]["step_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--capacity-rounds", type=int, default=1,
                        help="processes per capacity, in alternating order (the fastest counts)")
    parser.add_argument("--trace-steps", type=int, default=0,
                        help="capacity: profile this many steps per capacity (first round) and summarize them")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: small,large,ragged,capacity")
    parser.add_argument("--capacity-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capacity_child:
        capacity_child(args.checkpoint, args.capacity_child, args.repeats, args.trace_steps)
        return
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"bench": "multi_tenant", "rank": 32, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                    "train_seq": TRAIN_SEQ}
    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as home:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        if "small" not in skip:
            result["small"] = small_requests(directory, home, [int(n) for n in args.tenants.split(",")],
                                             args.repeats)
        if "large" not in skip:
            result["large"] = large_requests(directory, home, args.repeats)
        if "ragged" not in skip:
            result["ragged"] = ragged_requests(directory, home, args.repeats)
        if "capacity" not in skip:
            result["capacity"] = capacity(directory, args.repeats, args.capacity_rounds, args.trace_steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
