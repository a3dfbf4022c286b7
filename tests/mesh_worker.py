"""Sharded vs single-device results on 8 fake CPU devices, for `test_sharding_mesh.py`.

Run in a subprocess, because `--xla_force_host_platform_device_count=8` must be set before jax
starts (the rest of the suite runs on one device):

    python tests/mesh_worker.py OUT.json NAME=CHECKPOINT_DIR ...

For each checkpoint role it computes, once on one device and then on each mesh `(fsdp, tp)` of
`mesh_steps.PLAN`, the LoRA forward logprobs, the gradients w.r.t. the bank, two AdamW steps on one slot,
greedy decoding with an explicitly sharded KV cache (and once through `framework.sampling.generate`);
it writes the largest differences (and the reference magnitudes) as JSON,
together with facts about placement (loaded shards, how each parameter is split) and the
collectives in the compiled HLO of a training step (`hlo_collectives`).
"""

from __future__ import annotations

import os
import sys

# Backend optimisation off: compiling dominates this worker, and the comparisons are within one process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import functools
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import mesh_steps as ms
import numpy as np
from flax import nnx

from framework.optim import AdamHyperparams, init_opt_state
from framework.sharding import MeshConfig, MeshRules, make_mesh
from models import axes as ax
from models import load_checkpoint, read_config


def max_diff(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |b|) over the leaves of two pytrees."""
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    scale = [float(np.max(np.abs(np.asarray(y, np.float64)), initial=0.0)) for y in jax.tree.leaves(b)]
    return max(diffs), max(scale)


def run_all(base, bank, batch, prompt, steps: ms.Steps, *, generate: bool) -> dict[str, Any]:
    """Every quantity compared, computed with `steps` on arrays already placed. Host-side values are
    made in numpy and placed, so no eager jax op compiles per placement."""
    rules = steps.rules
    put = (lambda tree, shardings: jax.device_put(tree, shardings)) if rules else (lambda tree, _: jax.device_put(tree))
    host_weights = jax.tree.map(np.asarray, bank.weights)
    grad_s = rules.adapter_shardings(host_weights, slots=True) if rules else None
    out: dict[str, Any] = {}
    grads = put(jax.tree.map(np.zeros_like, host_weights), grad_s)
    grads, out["loss"], out["logprobs"] = steps.train_step(base, bank, grads, batch)
    grads, _, _ = steps.train_step(base, bank, grads, batch)  # accumulates: twice the gradient
    out["grads"] = jax.tree.map(np.asarray, grads)
    hp = AdamHyperparams.make(1e-2, weight_decay=0.1, grad_clip_norm=1.0)
    one = jax.tree.map(lambda w: w[:, 1], host_weights)
    opt_state = init_opt_state(one)
    opt_state = put(jax.tree.map(np.asarray, opt_state), rules.opt_state_shardings(
        init_opt_state, opt_state, rules.adapter_shardings(one, slots=False)) if rules else None)
    weights = put(host_weights, grad_s)
    for i in range(2):
        weights, grads, opt_state = steps.optim_step(weights, grads, opt_state, 1, hp)
        if i == 0:  # a second, different step
            grads = put(jax.tree.map(lambda g: np.asarray(g) + 0.01, out["grads"]), grad_s)
    out["adam_weights"], out["adam_state"] = weights, opt_state
    tokens, lengths, slot_ids = prompt
    out["cached_tokens"], out["cached_logprobs"], cache = steps.cached_greedy(base, bank, tokens, lengths, slot_ids)
    out["cache_specs"] = sorted({str(getattr(x.sharding, "spec", None)) for x in jax.tree.leaves(cache) if x.ndim == 4})
    if generate:
        out["generate_tokens"], out["generate_logprobs"] = steps.greedy_generate(base, bank, tokens, lengths, slot_ids)
    return out


def compare(name: str, mesh_shape: tuple[int, int], ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "mesh": list(mesh_shape), "cache_specs": got["cache_specs"]}
    for key in ("logprobs", "grads", "loss", "adam_weights", "adam_state", "generate_logprobs", "cached_logprobs"):
        if key in got:
            row[key] = max_diff(got[key], ref[key])
    for key in ("generate_tokens", "cached_tokens"):
        if key in got:
            row[key] = np.asarray(got[key]).tolist() == np.asarray(ref[key]).tolist()
    return row


def placement(role: str, mesh_shape: tuple[int, int], base: nnx.State, ref_base: nnx.State) -> dict[str, Any]:
    """Loaded-into-shards facts: equal values, each parameter's spec, and whether every device holds
    exactly its block (the shard shape its sharding implies) and nothing more."""
    flat = dict(nnx.to_flat_state(base))
    ref = dict(nnx.to_flat_state(ref_base))
    equal = all(np.array_equal(np.asarray(flat[p].get_value()), np.asarray(ref[p].get_value())) for p in flat)
    arrays = {p: v.get_value() for p, v in flat.items()}
    specs = {".".join(map(str, p)): str(x.sharding.spec) for p, x in arrays.items()}
    blocks = all(s.data.shape == x.sharding.shard_shape(x.shape) and len(x.addressable_shards) == 8
                 for x in arrays.values() for s in x.addressable_shards)
    return {"model": role, "mesh": list(mesh_shape), "equal": equal, "specs": specs, "blocks": blocks}


# ------------------------------------------------------------------------------------ HLO
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+?)\[([\d,]*)\]\S* ([\w-]+)\((.*?)\)(.*)$")
_PASS_THROUGH = {"bitcast", "copy", "reshape", "transpose", "convert", "dynamic-slice", "collective-permute"}
"""Ops an all-gather's operand is traced back through to the entry parameter it moves (and fusions of
such ops: the dynamic-slice and layout fusions XLA puts before a gather), into their largest operand."""


def replica_groups(attrs: str) -> list[list[int]]:
    """Device groups of a collective's `replica_groups` attribute, in any of XLA's spellings:
    explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)`, or mesh `mesh['a'=2,'b'=4] {'a'}` (optionally
    with `device_ids=([dims]T(perm))`)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
                  r"\{([^}]*)\}", attrs)
    if m:
        names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        sizes = [int(n) for _, n in names]
        chosen = [[n for n, _ in names].index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        ids = np.arange(int(np.prod(sizes)))
        if m.group(2):  # the mesh's devices, as an iota reshaped and transposed
            ids = ids.reshape([int(x) for x in m.group(2).split(",")])
            if m.group(3):
                ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = np.moveaxis(ids.reshape(sizes), chosen, range(-len(chosen), 0))
        return ids.reshape(-1, int(np.prod([sizes[i] for i in chosen]))).tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        ids = np.arange(int(np.prod([int(x) for x in m.group(2).split(",")])))
        ids = ids.reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape([int(x) for x in m.group(1).split(",")]).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    raise ValueError(f"no replica_groups parsed in {attrs[:200]!r}")


def mesh_axis_groups(mesh: jax.sharding.Mesh) -> dict[str, list[list[int]]]:
    """For each set of mesh axes, the groups of logical device ids (positions in the mesh) a collective
    over exactly those axes uses."""
    ids = np.arange(mesh.size).reshape(mesh.devices.shape)
    names = list(mesh.axis_names)
    out = {}
    for axes in (("fsdp",), ("tp",), ("fsdp", "tp")):
        moved = np.moveaxis(ids, [names.index(a) for a in axes], range(-len(axes), 0))
        size = int(np.prod([mesh.shape[a] for a in axes]))
        out["+".join(axes)] = sorted(sorted(g) for g in moved.reshape(-1, size).tolist())
    return out


def _pass_through_fusions(hlo: str) -> set[str]:
    """Fused computations whose non-scalar floating-point ops only move data (slice, copy, transpose,
    convert, ...): an all-gather fed by one still gathers the parameter it reads."""
    moves = {"parameter", "bitcast", "copy", "reshape", "transpose", "convert", "dynamic-slice", "slice"}
    out, name, ok = set(), None, True
    for line in hlo.splitlines():
        head = re.match(r"^%(\S+) .*\{$", line)
        if head:
            name, ok = head.group(1), True
        elif line.startswith("}") and name is not None:
            if ok:
                out.add(name)
            name = None
        elif name is not None:
            m = _INSTRUCTION.match(line)
            if m and m.group(2).startswith(("f", "bf")) and m.group(3) and m.group(4) not in moves:
                ok = False  # arithmetic on floating-point data (index arithmetic does not count)
    return out


def all_gathers(hlo: str, mesh: jax.sharding.Mesh) -> list[dict[str, Any]]:
    """Every all-gather in compiled HLO text: result shape and bytes, the mesh axes it gathers over,
    and the entry parameter whose data it moves (traced back through `_PASS_THROUGH` ops), if any."""
    instructions = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            name, dtype, dims, opcode, operands, attrs = m.groups()
            instructions[name] = (dtype, dims, opcode, re.findall(r"%(\S+?)(?:[,)]|$)", operands + ")"), attrs)
    moving = _pass_through_fusions(hlo)

    def passes(name: str) -> bool:
        opcode, attrs = instructions[name][2], instructions[name][4]
        if opcode != "fusion":
            return opcode in _PASS_THROUGH
        called = re.search(r"calls=%(\S+?)[,\s]", attrs + " ")
        return called is not None and called.group(1) in moving

    groups = mesh_axis_groups(mesh)
    out = []
    for dtype, dims, opcode, operands, attrs in instructions.values():
        if opcode not in ("all-gather", "all-gather-start"):
            continue
        root = operands[0]
        while root in instructions and passes(root):
            inputs = [o for o in instructions[root][3] if o in instructions]
            if not inputs:
                break
            root = max(inputs, key=lambda o: np.prod([int(x) for x in instructions[o][1].split(",") if x]))
        param = None
        if root in instructions and instructions[root][2] == "parameter":
            m = re.search(r'op_name="([^"]*)"', instructions[root][4])
            param = (m.group(1) if m else root).replace("\\'", "'")
        members = sorted(sorted(g) for g in replica_groups(attrs))
        axes = [k for k, v in groups.items() if v == members]
        shape = [int(x) for x in dims.split(",") if x]
        out.append({"shape": shape, "bytes": int(np.prod(shape)) * (2 if dtype in ("bf16", "f16") else 4),
                    "axes": axes[0] if axes else str(members), "param": param})
    return out


def param_info(base: nnx.State) -> dict[str, dict[str, Any]]:
    """Per parameter (named as HLO metadata names it): global shape, spec, and `gathered`, the block a
    device holds once the parameter's `fsdp` split is gathered (its `tp` split kept): what FSDP needs."""
    out = {}
    for path, v in nnx.to_flat_state(base):
        x = v.get_value()
        spec = x.sharding.spec
        no_fsdp = jax.sharding.PartitionSpec(*(
            None if e == "fsdp" else tuple(a for a in e if a != "fsdp") or None if isinstance(e, tuple) else e
            for e in spec))
        gathered = jax.sharding.NamedSharding(x.sharding.mesh, no_fsdp).shard_shape(x.shape)
        name = "base" + "".join(f"[{p!r}]" for p in path) + ".value"
        out[name] = {"shape": list(x.shape), "spec": str(spec), "fsdp": "fsdp" in str(spec),
                     "gathered": list(gathered)}
    return out


def sharded_splash() -> list[dict[str, Any]]:
    """`MeshRules.shard_attention` around the Pallas splash kernel (interpreted) on a (2, 4) mesh against
    `causal_attention` on one device: values and gradients, with kv heads split over tp and not."""
    from models.config import ModelConfig
    from models.fused_attention import splash_attention
    from models.transformer import causal_attention

    out = []
    for kv_heads in (4, 2):  # 4: q and kv heads split over tp=4; 2: kv heads cannot split, so neither does
        config = ModelConfig(model_type="llama", vocab_size=8, hidden_size=128, intermediate_size=8, num_layers=1,
                             num_heads=8, num_kv_heads=kv_heads, head_dim=16)
        rules = MeshRules.for_model(make_mesh(MeshConfig(data=1, fsdp=2, tp=4)), config)
        rng = np.random.default_rng(kv_heads)
        q = rng.normal(size=(8, 128, 8, 16)).astype(np.float32)
        k, v = (rng.normal(size=(8, 128, kv_heads, 16)).astype(np.float32) for _ in range(2))
        w = rng.normal(size=q.shape).astype(np.float32)
        attend = rules.shard_attention(functools.partial(splash_attention, interpret=True))

        def grads(fn, q, k, v, w=w):
            return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

        def place(x, n, rules=rules):
            return jax.device_put(x, rules.sharding((ax.BATCH, ax.LENGTH, n, ax.HEAD_DIM), x.shape))
        got = jax.jit(functools.partial(grads, attend))(place(q, ax.ACT_HEADS), place(k, ax.ACT_KV_HEADS),
                                                                  place(v, ax.ACT_KV_HEADS))
        ref = jax.jit(functools.partial(grads, causal_attention))(q, k, v)
        outputs = jax.jit(attend)(place(q, ax.ACT_HEADS), place(k, ax.ACT_KV_HEADS), place(v, ax.ACT_KV_HEADS))
        spec = [*outputs.sharding.spec, *[None] * (4 - len(outputs.sharding.spec))]
        out.append({"kv_heads": kv_heads, "grads": max_diff(got, ref),
                    "out": max_diff(outputs, causal_attention(q, k, v)), "spec": spec})
    return out


def main(out_path: str, checkpoints: dict[str, Path]) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    results: dict[str, Any] = {"cases": [], "placement": [], "hlo": [], "memory": []}
    for role, checkpoint in checkpoints.items():
        config, _ = read_config(checkpoint)
        ref_model = load_checkpoint(checkpoint)  # unsharded, on the default device
        graphdef, ref_base = nnx.split(ref_model)
        bank, batch = ms.random_bank(config), ms.make_batch(config)
        tokens, lengths = ms.prompts(config)
        prompt = (tokens, lengths, batch.slot_ids)
        ref = run_all(ref_base, bank, batch, prompt, ms.Steps(graphdef, config, None), generate=role == ms.GENERATE[0])
        for mesh_shape in ms.PLAN[role]:
            fsdp, tp = mesh_shape
            mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp, tp=tp))
            rules = MeshRules.for_model(mesh, config)
            model = load_checkpoint(checkpoint, shardings=rules.param_sharding_map(config, ref_base))
            graphdef_m, base = nnx.split(model)
            results["placement"].append(placement(role, mesh_shape, base, ref_base))
            placed_bank = jax.device_put(bank, rules.bank_shardings(bank))
            placed_batch = ms.Batch(*(jax.device_put(x, rules.batch_sharding(x.shape)) for x in
                                      (batch.tokens, batch.targets, batch.mask, batch.slot_ids)))
            placed_prompt = tuple(jax.device_put(x, rules.batch_sharding(x.shape)) for x in prompt)
            steps = ms.Steps(graphdef_m, config, rules)
            got = run_all(base, placed_bank, placed_batch, placed_prompt, steps,
                          generate=(role, mesh_shape) == ms.GENERATE)
            results["cases"].append(compare(role, mesh_shape, ref, got))
            results["hlo"].append({"model": role, "mesh": list(mesh_shape), "params": param_info(base),
                                   "all_gathers": all_gathers(steps.train_hlo, mesh)})
            memory = steps.train_memory
            results["memory"].append({"model": role, "mesh": list(mesh_shape), "temp": memory.temp_size_in_bytes,
                                      "arguments": memory.argument_size_in_bytes})
    results["splash"] = sharded_splash()
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], {k: Path(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])})
