"""The programs a multi-tenant RL sampling workload compiles, with and without the accelerator's shape
floors: a proxy, on any machine, for the compile stalls of an accelerator (seconds each there, and
every tenant waits for them).

Compiles depend on shapes, not on the model's size or speed, so this runs a tiny random Qwen3 and drives
the engine deterministically (no threads, no clocks): 8 tenants, each iteration publishing its weights,
sampling G = 8 completions of a 64-token prompt (48 new tokens), then 3 turns continuing every
conversation with 8 new "user" tokens (the 8 submitted together), then an optim_step (a new version:
the next iteration's prompts miss the prefix cache). Tenants wait a random 0-5 decode chunks between
steps, so their phases drift apart as they would in a server. Each run is a fresh process; reports the
programs compiled by the end of each iteration (all of them, and the decode loop's by kind) and how many
the iterations after the second still compiled.

    python -m bench.compiles [--tenants 8] [--iterations 6] [--seeds 0,1,2]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import jax
import numpy as np

from bench.common import build_qwen3_checkpoint, log
from framework.engine import Engine, EngineConfig, OptimRequest, SampleJob
from framework.optim import AdamHyperparams

G, PROMPT_LEN, NEW_TOKENS, USER_TOKENS, TURNS = 8, 64, 48, 8, 4
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
FLOORS = {"accelerator_floors": {"min_decode_rows": 8, "min_prefill_tokens": 128}, "no_floors": {}}


class _Compiles:
    """Every XLA compile in this process (jax.monitoring's backend-compile events)."""

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = _Compiles()


class _Tenant:
    """One tenant's RL iterations as a state machine the driver advances between decode chunks."""

    def __init__(self, engine: Engine, index: int, rng: np.random.Generator, hp: AdamHyperparams):
        self.engine, self.rng, self.hp = engine, rng, hp
        self.adapter_id = engine.create_adapter(rank=32, seed=index).adapter_id
        self.prompt = rng.integers(3, engine.model_config.vocab_size, PROMPT_LEN).astype(np.int32)
        self.iteration, self.turn, self.futures, self.snapshot = 0, 0, [], None
        self.pause = int(rng.integers(0, 6))
        self.conversations: list[np.ndarray] = []

    def _job(self, prompt: np.ndarray, n: int, seed: int) -> SampleJob:
        return SampleJob(snapshot_id=self.snapshot.snapshot_id, prompt=prompt, num_samples=n, max_tokens=NEW_TOKENS,
                         temperature=1.0, top_p=1.0, top_k=-1, seed=seed)

    def advance(self) -> bool:
        """One move if its requests are done and its pause is over; True when an iteration ended."""
        if any(not f.done() for f in self.futures):
            return False
        if self.pause:
            self.pause -= 1
            return False
        if self.turn == 0:
            self.snapshot = self.engine.publish(self.adapter_id)
            self.futures = [self.engine.submit_sample(self._job(self.prompt, G, self.iteration))]
        elif self.turn < TURNS:
            if self.turn == 1:
                completions = [s.tokens for s in self.futures[0].result().sequences]
                self.conversations = [self.prompt] * G
            else:
                completions = [f.result().sequences[0].tokens for f in self.futures]
            vocab = self.engine.model_config.vocab_size
            self.conversations = [np.concatenate([c, np.asarray(t, np.int32), self.rng.integers(3, vocab, USER_TOKENS)
                                                  .astype(np.int32)]) for c, t in zip(self.conversations, completions,
                                                                                      strict=True)]
            self.futures = [self.engine.submit_sample(self._job(c, 1, 100 * self.turn + g))
                            for g, c in enumerate(self.conversations)]
        else:
            self.engine.optim_step([OptimRequest(self.adapter_id, self.hp)])
            self.engine.release_snapshot(self.snapshot.snapshot_id)
            self.iteration, self.turn, self.futures = self.iteration + 1, 0, []
            self.pause = int(self.rng.integers(0, 6))
            return True
        self.turn += 1
        return False


def run(directory: str, floors: dict, tenants: int, iterations: int, seed: int) -> dict:
    engine = Engine(directory, EngineConfig(max_rank=32, **floors))
    rng = np.random.default_rng(seed)
    hp = AdamHyperparams.make(1e-4)
    start = COMPILES.count
    people = [_Tenant(engine, i, rng, hp) for i in range(tenants)]
    by_iteration = [0] * iterations  # programs compiled once every tenant finished iteration i
    while any(t.iteration < iterations for t in people):
        for t in people:
            if t.iteration < iterations and t.advance():
                done = min(p.iteration for p in people)
                for i in range(done):
                    by_iteration[i] = by_iteration[i] or COMPILES.count - start
        engine.step_sampling()
    by_iteration[-1] = COMPILES.count - start
    decode_loop = {k: engine.compile_counts[k] for k in ("prefill", "admit", "decode", "pool_resize")}
    return {"programs": COMPILES.count - start, "by_iteration": by_iteration,
            "after_second_iteration": by_iteration[-1] - by_iteration[min(1, iterations - 1)],
            "decode_loop": decode_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "FLOORS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        directory, name, seed = args.child
        print(json.dumps(run(directory, FLOORS[name], args.tenants, args.iterations, int(seed))))
        return
    result: dict = {"bench": "compiles", "tenants": args.tenants, "iterations": args.iterations, "G": G,
                    "turns": TURNS}
    with tempfile.TemporaryDirectory() as directory:
        build_qwen3_checkpoint(directory, config=TINY)
        for name in FLOORS:
            runs = []
            for seed in args.seeds.split(","):  # each in a fresh process: nothing compiled before it
                out = subprocess.run([sys.executable, "-m", "bench.compiles", "--tenants", str(args.tenants),
                                      "--iterations", str(args.iterations), "--child", directory, name, seed],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                log(f"{name} seed {seed}: {runs[-1]}")
            result[name] = {"runs": runs, "programs_mean": round(float(np.mean([r["programs"] for r in runs])), 1),
                            "after_second_iteration_mean": round(float(np.mean(
                                [r["after_second_iteration"] for r in runs])), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
