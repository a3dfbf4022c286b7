"""Multi-tenant batching: N users' requests in one compiled call vs the same requests one at a time.

N training clients (LoRA rank 32 on every linear layer) share one engine over the random Qwen3 of
`bench/common.py`. Each user's step is a `forward_backward` of one 128-token sequence plus an
`optim_step`; each user's sample is 4 continuations of 64 tokens. Through the public client API:

- one at a time: each user's call is awaited before the next user submits (what N separate
  single-tenant servers would do on this machine, back to back);
- together: every user submits, then all wait; the scheduler runs the N users' `forward_backward`s
  (and samples) as one batch, and the N `optim_step`s after them.

Also checks that the adapters stay apart (each user's loss after the steps equals a replay of that
user alone) and that adding users compiles nothing new once the shapes are warm.

    python -m bench.multi_tenant [--users 8] [--repeats 3]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from bench.common import alternate_best, build_qwen3_checkpoint, log
from framework import ServiceClient, types
from framework.engine import EngineConfig

SEQ = 128
SAMPLES, NEW_TOKENS = 4, 64
ADAM = types.AdamParams(learning_rate=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.users

    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryDirectory() as home:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        config = EngineConfig(max_adapters=n + 1, max_rank=32, sampler_slots=n)  # + the replay below
        with ServiceClient(engine_config=config, home=home) as service:
            clients = [service.create_lora_training_client(directory, rank=32, seed=i) for i in range(n)]
            engine = clients[0]._engine
            rng = np.random.default_rng(0)
            vocab = engine.model_config.vocab_size
            data = []
            for _ in range(n):
                ids = rng.integers(3, vocab, SEQ + 1)
                data.append([types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                                         loss_fn_inputs={"target_tokens": ids[1:],
                                                         "weights": np.ones(SEQ, np.float32)})])
            prompts = [types.ModelInput.from_ints(rng.integers(3, vocab, 16).tolist()) for _ in range(n)]
            params = types.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=0, stop=[])

            def train_one_at_a_time() -> None:
                for c, d in zip(clients, data, strict=True):
                    c.forward_backward(d, "cross_entropy").result()
                    c.optim_step(ADAM).result()

            def train_together() -> None:
                futures = [(c.forward_backward(d, "cross_entropy"), c.optim_step(ADAM))
                           for c, d in zip(clients, data, strict=True)]
                for fb, opt in futures:
                    fb.result(), opt.result()

            samplers = [c.save_weights_and_get_sampling_client() for c in clients]

            def sample_one_at_a_time() -> None:
                for s, p in zip(samplers, prompts, strict=True):
                    s.sample(p, SAMPLES, params).result()

            def sample_together() -> None:
                for f in [s.sample(p, SAMPLES, params) for s, p in zip(samplers, prompts, strict=True)]:
                    f.result()

            log("compiling / warming up")
            for fn in (train_one_at_a_time, train_together, sample_one_at_a_time, sample_together):
                fn()
            compiles_warm = dict(engine.compile_counts)
            train = alternate_best({"one_at_a_time": train_one_at_a_time, "together": train_together},
                                   args.repeats)
            sample = alternate_best({"one_at_a_time": sample_one_at_a_time, "together": sample_together},
                                    args.repeats)
            compiles_after = dict(engine.compile_counts)

            # Isolation: every user has now taken the same number of steps with its own data; a fresh
            # adapter given only that user's history must land on the same loss.
            steps = 2 + 2 * args.repeats  # the warm-up's two training calls, then the timed ones
            losses = [c.forward(d, "cross_entropy").result().metrics["loss:sum"]
                      for c, d in zip(clients, data, strict=True)]
            replay = service.create_lora_training_client(directory, rank=32, seed=n - 1)
            for _ in range(steps):
                replay.forward_backward(data[-1], "cross_entropy")
                replay.optim_step(ADAM)
            replay_loss = replay.forward(data[-1], "cross_entropy").result().metrics["loss:sum"]

    train_tokens = n * SEQ
    sample_tokens = n * SAMPLES * NEW_TOKENS
    print(json.dumps({
        "bench": "multi_tenant", "users": n, "seq": SEQ, "samples_per_user": SAMPLES, "new_tokens": NEW_TOKENS,
        "train_tokens_per_s_one_at_a_time": round(train_tokens / train["one_at_a_time"], 1),
        "train_tokens_per_s_together": round(train_tokens / train["together"], 1),
        "train_ratio": round(train["one_at_a_time"] / train["together"], 3),
        "sample_tokens_per_s_one_at_a_time": round(sample_tokens / sample["one_at_a_time"], 1),
        "sample_tokens_per_s_together": round(sample_tokens / sample["together"], 1),
        "sample_ratio": round(sample["one_at_a_time"] / sample["together"], 3),
        "last_user_loss": losses[-1], "last_user_replayed_alone": replay_loss,
        "new_compiles_after_warmup": {k: compiles_after[k] - compiles_warm.get(k, 0) for k in compiles_after
                                      if compiles_after[k] != compiles_warm.get(k, 0)},
    }))


if __name__ == "__main__":
    main()
