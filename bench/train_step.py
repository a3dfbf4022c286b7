"""LoRA training-step throughput: our engine vs transformers + peft + torch.optim.AdamW, on CPU.

Same random Qwen3 weights (`bench/common.py`), LoRA rank 32 (alpha 32) on every linear layer of
every block (q, k, v, o, gate, up, down), batch 8 × 256, one step = forward + backward of the
summed token cross-entropy + one AdamW update. Ours runs through `Engine.forward(..., backward=True)`
+ `Engine.optim_step`, the path every `TrainingClient` takes. Both sides start from the same LoRA
A (B = 0) and the first-step losses are compared.

FLOP count for the fraction of peak: base matmuls forward + input-gradient backward (the frozen
weights need no weight gradient) = 2× the forward's dense FLOPs, attention 3× (forward + two
backward products), LoRA terms 3×; the machine's peak is a jitted 2048³ fp32 matmul.

    python bench/train_step.py [--batch 8] [--seq 256] [--repeats 6]

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
import transformers

from bench.common import alternate_best, build_qwen3_checkpoint, log, matmul_peak
from framework.engine import DatumArrays, Engine, EngineConfig, ForwardRequest, OptimRequest
from framework.optim import AdamHyperparams
from lora import ATTN_TARGETS, MLP_TARGETS

RANK = 32
HF_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_flops_per_token(config, seq: int, rank: int) -> float:
    d, f = config.hidden_size, config.intermediate_size
    dense = d * (config.q_size + 2 * config.kv_size) + config.q_size * d + 3 * d * f
    lora = sum(rank * (i + o) for i, o in [(d, config.q_size), (d, config.kv_size), (d, config.kv_size),
                                           (config.q_size, d), (d, f), (d, f), (f, d)])
    attention = 2 * 2 * config.q_size * (seq + 1) / 2
    per_layer = 2 * 2 * dense + 3 * attention + 3 * 2 * lora
    return config.num_layers * per_layer + 2 * 2 * d * config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=6)  # ours keeps speeding up over the first few steps
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as directory:
        log(f"building random Qwen3 checkpoint in {directory}")
        build_qwen3_checkpoint(directory)
        engine = Engine(directory, EngineConfig(max_adapters=1, max_rank=RANK, sampler_slots=1,
                                                targets=ATTN_TARGETS + MLP_TARGETS))
        base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    import peft

    torch_model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=HF_MODULES,
                                                             lora_dropout=0.0))
    torch_model.train()
    config = engine.model_config
    adapter = engine.create_adapter(rank=RANK, seed=0, targets=ATTN_TARGETS + MLP_TARGETS, alpha=RANK)
    with torch.no_grad():  # same starting adapter on both sides
        weights = engine.adapter_weights(adapter.adapter_id)
        for name, module in torch_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                layer = int(name.split("layers.")[1].split(".")[0])
                target = dict(zip(HF_MODULES, ATTN_TARGETS + MLP_TARGETS, strict=True))[name.split(".")[-1]]
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(weights[target]["a"][layer]).T))
    optimizer = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=1e-4,
                                  betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1), dtype=np.int64)
    datums = [DatumArrays(t[:-1].astype(np.int32), {"target_tokens": t[1:].astype(np.int32),
                                                    "weights": np.ones(args.seq, np.float32)}) for t in tokens]
    inputs, targets = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
    hp = AdamHyperparams.make(1e-4)

    def run_ours() -> float:
        result = engine.forward([ForwardRequest(adapter.adapter_id, datums, "cross_entropy")], backward=True)
        engine.optim_step([OptimRequest(adapter.adapter_id, hp)])
        return result[0].loss

    def run_torch() -> float:
        logits = torch_model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    log("compiling / warming up")
    ours_loss, torch_loss = run_ours(), run_torch()
    log(f"first-step loss: ours {ours_loss:.4f}, torch {torch_loss:.4f}")
    best = alternate_best({"ours": run_ours, "torch": run_torch}, args.repeats)
    n = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq, RANK) * n
    log("measuring fp32 matmul peak (2048³)")
    peak = matmul_peak()
    print(json.dumps({
        "bench": "train_step", "batch": args.batch, "seq": args.seq, "rank": RANK,
        "ours_tokens_per_s": round(n / best["ours"], 1), "torch_tokens_per_s": round(n / best["torch"], 1),
        "ratio": round(best["torch"] / best["ours"], 3),
        "ours_fraction_of_peak": round(flops / best["ours"] / peak, 3),
        "torch_fraction_of_peak": round(flops / best["torch"] / peak, 3),
        "matmul_peak_flops": round(peak), "first_loss_ours": ours_loss, "first_loss_torch": torch_loss,
        "compiles": dict(engine.compile_counts), "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
