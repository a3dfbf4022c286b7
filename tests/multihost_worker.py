"""One of the processes of `test_distributed.py`'s two-process run (CPU, gloo collectives):

    python tests/multihost_worker.py OUT.npz CHECKPOINT PROCESS_ID NUM_PROCESSES COORDINATOR

Each process has 2 CPU devices; together they form a global (fsdp=2, tp=2) mesh. Every process loads
its own blocks of the checkpoint, places the same batch and bank, and runs one LoRA training step
(gradients into the buffer, then AdamW on one slot) through the same compiled steps the 8-device
equality test uses; process 0 writes the results, gathered to the host, to OUT.npz.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import mesh_steps as ms
import numpy as np
from flax import nnx

from framework.distributed import DistributedConfig, fetch, initialize, put_global
from framework.optim import AdamHyperparams, init_opt_state
from framework.sharding import MeshConfig, MeshRules, make_mesh
from models import Transformer, load_checkpoint, read_config


def main(out: str, checkpoint: str, process_id: int, num_processes: int, coordinator: str) -> None:
    first = initialize(DistributedConfig(enabled=True, coordinator_address=coordinator, num_processes=num_processes,
                                         process_id=process_id))
    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
    config, _ = read_config(checkpoint)
    rules = MeshRules.for_model(make_mesh(MeshConfig(fsdp=-1, tp=2)), config)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    graphdef, base = nnx.split(load_checkpoint(checkpoint, shardings=rules.param_sharding_map(config, abstract)))
    steps = ms.Steps(graphdef, config, rules)
    host_bank, batch = ms.random_bank(config), ms.make_batch(config)
    bank = put_global(host_bank, rules.bank_shardings(host_bank))
    batch = ms.Batch(*(put_global(x, rules.batch_sharding(x.shape)) for x in
                       (batch.tokens, batch.targets, batch.mask, batch.slot_ids)))
    grad_s = rules.adapter_shardings(host_bank.weights, slots=True)
    grads = put_global(jax.tree.map(np.zeros_like, host_bank.weights), grad_s)
    grads, loss, logprobs = steps.train_step(base, bank, grads, batch)
    one = jax.tree.map(lambda w: w[:, 1], host_bank.weights)
    opt_state = init_opt_state(one)
    opt_s = rules.opt_state_shardings(init_opt_state, opt_state, rules.adapter_shardings(one, slots=False))
    opt_state = put_global(jax.tree.map(np.asarray, opt_state), opt_s)
    grads_host = fetch(grads)
    weights, _, opt_state = steps.optim_step(put_global(host_bank.weights, grad_s), grads, opt_state, 1,
                                             AdamHyperparams.make(1e-2, weight_decay=0.1, grad_clip_norm=1.0))
    results = {"loss": fetch(loss), "logprobs": fetch(logprobs), "grads": grads_host, "weights": fetch(weights),
               "mu": fetch(opt_state.inner_state[0].mu)}
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(results)[0]}
    if first:
        np.savez(out, processes=jax.process_count(), devices=jax.device_count(), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
