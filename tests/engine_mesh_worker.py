"""The engine on 8 fake CPU devices vs on one, for `test_engine_mesh.py`.

Run in a subprocess, because `--xla_force_host_platform_device_count=8` must be set before jax
starts (the rest of the suite runs on one device):

    python tests/engine_mesh_worker.py OUT.json CHECKPOINT_DIR

The same workload runs on an engine over one device and on engines over meshes of all 8 (the
default `EngineConfig()`, and explicit `MeshConfig`s): two adapters trained in one batch
(forward_backward, one more in a row both share, and a batched optim_step), a forward pass, an
adapter paged out and back in, and greedy sampling from a published snapshot and from the base
model. It writes, per mesh, the largest differences from the single-device results, the compiles a
repeat of the workload caused, and how the engine placed its state.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json
from typing import Any

import jax
import numpy as np

from framework.engine import Engine, EngineConfig
from framework.engine.requests import DatumArrays, ForwardRequest, LogprobsRequest, OptimRequest, SampleJob
from framework.optim import AdamHyperparams
from framework.sharding import MeshConfig

MESHES: dict[str, MeshConfig | None] = {
    "default": None,  # EngineConfig()'s own mesh: every device along fsdp
    "fsdp2_tp4": MeshConfig(fsdp=2, tp=4),
    "data2_fsdp2_tp2": MeshConfig(data=2, fsdp=2, tp=2),
}


def datums(vocab: int, lengths: list[int], seed: int) -> list[DatumArrays]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, vocab, n + 1).astype(np.int32)
        out.append(DatumArrays(ids[:-1], {"target_tokens": ids[1:], "weights": rng.random(n).astype(np.float32)}))
    return out


def workload(engine: Engine) -> dict[str, Any]:
    """Every compared quantity, as host arrays."""
    vocab = engine.model_config.vocab_size
    a = engine.create_adapter(rank=4, seed=1, adapter_id="a").adapter_id
    b = engine.create_adapter(rank=8, seed=2, adapter_id="b").adapter_id
    out: dict[str, Any] = {}

    def train(round_: int) -> None:
        results = engine.forward([ForwardRequest(a, datums(vocab, [12, 7], 10 + round_), "cross_entropy"),
                                  ForwardRequest(b, datums(vocab, [20], 20 + round_), "cross_entropy")], backward=True)
        out[f"fb{round_}_logprobs"] = [lp for r in results for lp in r.logprobs]
        out[f"fb{round_}_loss"] = [r.loss for r in results]
        # Two short sequences of different adapters: one row holding both (`packing`, rows mixing adapters).
        mixed = engine.forward([ForwardRequest(a, datums(vocab, [12], 40 + round_), "cross_entropy"),
                                ForwardRequest(b, datums(vocab, [9], 50 + round_), "cross_entropy")], backward=True)
        out[f"mixed{round_}_logprobs"] = [lp for r in mixed for lp in r.logprobs]
        out["mixed_batches"] = engine.metrics()["training"]["mixed_batches"]
        out[f"grads{round_}"] = jax.device_get([engine.adapters.get(x).grads for x in (a, b)])
        engine.optim_step([OptimRequest(a, AdamHyperparams.make(1e-2)), OptimRequest(b, AdamHyperparams.make(2e-2))])
        out[f"weights{round_}"] = jax.device_get([engine.adapter_weights(x) for x in (a, b)])

    train(0)
    compiles = dict(engine.compile_counts)
    train(1)
    out["recompiles"] = {k: v - compiles.get(k, 0) for k, v in engine.compile_counts.items()
                         if v != compiles.get(k, 0)}
    # Page a and b out (max_adapters=2) and a back in: its next forward must not change.
    (before,) = engine.forward([ForwardRequest(a, datums(vocab, [9], 30), "cross_entropy")], backward=False)
    engine.create_adapter(rank=2, seed=3, adapter_id="c")
    engine.create_adapter(rank=2, seed=4, adapter_id="d")
    paged_out = not engine.adapters.get(a).resident
    (after,) = engine.forward([ForwardRequest(a, datums(vocab, [9], 30), "cross_entropy")], backward=False)
    out["forward_logprobs"] = before.logprobs
    out["paged_forward_diff"] = float(np.max(np.abs(before.logprobs[0] - after.logprobs[0])))
    out["paged_out"] = paged_out

    snapshot = engine.publish(a).snapshot_id
    rng = np.random.default_rng(5)
    jobs = [SampleJob(snapshot_id=snapshot, prompt=rng.integers(3, vocab, 6).astype(np.int32), num_samples=2,
                      max_tokens=6, temperature=0.0, top_p=1.0, top_k=0, seed=0),
            SampleJob(snapshot_id="base", prompt=rng.integers(3, vocab, 11).astype(np.int32), num_samples=1,
                      max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=0)]
    results = engine.sample(jobs)
    out["sample_tokens"] = [row.tokens for r in results for row in r.sequences]
    out["sample_logprobs"] = [np.asarray(row.logprobs, np.float32) for r in results for row in r.sequences]
    # the SDK's compute_logprobs (a one-token sample asking for prompt logprobs): one training forward
    (one_pass,) = engine.sample([SampleJob(snapshot_id=snapshot, prompt=rng.integers(3, vocab, 14).astype(np.int32),
                                           num_samples=1, max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                                           prompt_logprobs=True)])
    out["one_pass_logprobs"] = one_pass.prompt_logprobs[1:]
    out["one_pass_requests"] = engine.metrics()["sampling"]["one_pass_requests"]
    # compute_logprobs of a sampled sequence and of a new one: through the prefix cache's rows
    sampled = np.concatenate([jobs[0].prompt, np.asarray(results[0].sequences[0].tokens, np.int32)])
    scored = engine.logprobs([LogprobsRequest(snapshot, sampled),
                              LogprobsRequest(snapshot, rng.integers(3, vocab, 13).astype(np.int32))])
    out["scored_logprobs"] = [lp[1:] for lp in scored]
    weights = engine.adapter_weights(a)
    out["placement"] = {
        "mesh": dict(engine.placement.mesh.shape),
        "describe": engine.placement.describe(),
        "adapter_q_a": list(weights["q"]["a"].sharding.spec) if engine.placement.sharded else [],
        "adapter_devices": len(weights["q"]["a"].sharding.device_set),
        "base_devices": len(jax.tree.leaves(engine._base)[0].sharding.device_set),
        "bank_devices": len(jax.tree.leaves(engine.snapshots.bank)[0].sharding.device_set),
    }
    return out


def compare(x: Any, ref: Any) -> tuple[float, float]:
    """(max |x - ref|, max |ref|) over matching leaves."""
    xs, rs = jax.tree.leaves(x), jax.tree.leaves(ref)
    assert len(xs) == len(rs)
    diff = max(float(np.max(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)), initial=0.0))
               for p, q in zip(xs, rs, strict=True))
    return diff, max(float(np.max(np.abs(np.asarray(q, np.float64)), initial=0.0)) for q in rs)


def main(out_path: str, checkpoint: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    base_config = dict(max_adapters=2, max_rank=8, sampler_slots=2, decode_rows=4)
    reference = workload(Engine(checkpoint, EngineConfig(**base_config, mesh=MeshConfig(fsdp=1)),
                                devices=jax.devices()[:1]))
    report: dict[str, Any] = {"reference": {"recompiles": reference["recompiles"], "placement": reference["placement"],
                                            "mixed_batches": reference["mixed_batches"]}, "meshes": {}}
    numeric = [k for k in reference if k not in ("recompiles", "placement", "sample_tokens", "paged_out",
                                                 "paged_forward_diff", "mixed_batches", "one_pass_requests")]
    for name, mesh in MESHES.items():
        config = EngineConfig(**base_config) if mesh is None else EngineConfig(**base_config, mesh=mesh)
        got = workload(Engine(checkpoint, config))
        report["meshes"][name] = {
            "diffs": {k: compare(got[k], reference[k]) for k in numeric},
            "sample_tokens_equal": got["sample_tokens"] == reference["sample_tokens"],
            "recompiles": got["recompiles"], "placement": got["placement"],
            "paged_out": got["paged_out"], "paged_forward_diff": got["paged_forward_diff"],
            "mixed_batches": got["mixed_batches"], "one_pass_requests": got["one_pass_requests"],
        }
        print(name, json.dumps(report["meshes"][name]["placement"]), file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
