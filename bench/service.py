"""Remote vs in-process: the same pipelined train + sample workload through the official `tinker` SDK
over loopback to `python -m service`, and through the in-process client. Target: remote ≤ 1.15×.

One step of the workload (an RL loop's shape): publish the adapter's weights as a sampler, submit
`--prompts` sampling requests of `--samples` continuations of `--new-tokens` tokens at once, wait for
all, then submit a `forward_backward` of `--batch` sequences of `--seq` tokens and an `optim_step`
together and wait for both. Both sides use the same engine settings and base model; the server runs
in its own process. Each side runs a warm-up step (compilation) and then the timed steps; the
repeats alternate between the sides and the best time of each is kept, as in `bench/common.py`.

    python -m bench.service [--base-model DIR] [--steps 3] [--repeats 3]

Without `--base-model` it builds the random Qwen3 of `bench/common.py`. Progress goes to stderr;
the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import alternate_best, build_qwen3_checkpoint, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base_model: str, root: Path, engine_args: list[str]) -> tuple[subprocess.Popen, str, str]:
    import httpx

    from service.store import Store

    root.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{root / 'state.db'}"
    store = Store(db)
    key = store.create_key("bench")
    store.close()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "service", "--base-model", base_model, "--port", str(port),
                               "--db", db, "--checkpoint-dir", str(root / "checkpoints"), "--log-level", "WARNING",
                               *engine_args], stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return server, url, key
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not come up")


class Workload:
    """One client's pipelined steps; `types` is `framework.types` or the SDK's `tinker.types`."""

    def __init__(self, trainer: Any, types: Any, args: argparse.Namespace, vocab: int, sdk: bool):
        self.trainer, self.types, self.args, self.sdk = trainer, types, args, sdk
        rng = np.random.default_rng(0)
        self.data = []
        for _ in range(args.batch):
            ids = rng.integers(3, vocab, args.seq + 1)
            self.data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                                         loss_fn_inputs={"target_tokens": ids[1:].astype(np.int64),
                                                         "weights": np.ones(args.seq, np.float32)}))
        self.prompts = [types.ModelInput.from_ints(rng.integers(3, vocab, args.prompt_len).tolist())
                        for _ in range(args.prompts)]
        self.params = types.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0, stop=[])
        self.adam = types.AdamParams(learning_rate=1e-4)

    def step(self) -> None:
        sampler = self.trainer.save_weights_and_get_sampling_client()
        if self.sdk:
            sampler = sampler.result()
        futures = [sampler.sample(p, self.args.samples, self.params) for p in self.prompts]
        for f in futures:
            f.result()
        fb = self.trainer.forward_backward(self.data, "cross_entropy")
        opt = self.trainer.optim_step(self.adam)
        fb.result(), opt.result()

    def run(self) -> None:
        for _ in range(self.args.steps):
            self.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=None, help="a local HF checkpoint (default: build the bench Qwen3)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TINKER_TELEMETRY", "0")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = args.base_model
        if base is None:
            base = str(root / "model")
            log(f"building random Qwen3 checkpoint in {base}")
            build_qwen3_checkpoint(base)
        base = str(Path(base).absolute())
        engine = dict(max_adapters=2, max_rank=args.rank, sampler_slots=8, max_seq_len=0, dtype="float32")
        engine_args = ["--max-adapters", "2", "--max-rank", str(args.rank), "--sampler-slots", "8", "--dtype",
                       "float32"]
        server, url, key = start_server(base, root / "server", engine_args)
        try:
            import tinker

            from framework import ServiceClient, types
            from framework.engine import EngineConfig
            from models import read_config

            vocab = read_config(base)[0].vocab_size
            local_service = ServiceClient(engine_config=EngineConfig(**engine), home=root / "local")
            local = Workload(local_service.create_lora_training_client(base, rank=args.rank, seed=0), types, args,
                             vocab, sdk=False)
            sdk_service = tinker.ServiceClient(base_url=url, api_key=key)
            remote = Workload(sdk_service.create_lora_training_client(base_model=base, rank=args.rank, seed=0).result(),
                              tinker.types, args, vocab, sdk=True)
            log("warm-up (compilation) on both sides")
            warm = {"in_process": 0.0, "remote": 0.0}
            for name, workload in (("in_process", local), ("remote", remote)):
                t0 = time.perf_counter()
                workload.step()
                warm[name] = time.perf_counter() - t0
            best = alternate_best({"in_process": local.run, "remote": remote.run}, args.repeats)
            sdk_service.close("success").result()
            local_service.close()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    per_step = {k: v / args.steps for k, v in best.items()}
    result = {
        "bench": "service", "base_model": args.base_model or "random qwen3 (bench/common.py)",
        "workload": {k: getattr(args, k) for k in ("rank", "batch", "seq", "prompts", "samples", "prompt_len",
                                                   "new_tokens", "steps", "repeats")},
        "in_process_s_per_step": round(per_step["in_process"], 4), "remote_s_per_step": round(per_step["remote"], 4),
        "remote_over_in_process": round(per_step["remote"] / per_step["in_process"], 3), "target": 1.15,
        "warmup_s": {k: round(v, 2) for k, v in warm.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
