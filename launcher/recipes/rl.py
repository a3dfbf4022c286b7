"""RL with group-centred rewards (GRPO-style, no std normalisation), through the client API only.

One step:
1. publish the current weights (`save_weights_and_get_sampling_client`) and submit every sampling
   request at once: G completions for each of P problems (seeds from (seed, step, problem));
2. grade each completion with the env; advantage = reward − mean reward of its group (divided by
   the group's standard deviation with `rl.scale_by_std`, as in GRPO). A group whose rewards are
   all equal teaches nothing and is dropped (unless a KL penalty gives its tokens a signal);
3. optional KL penalty to the base model: the base model scores the sampled tokens
   (`compute_logprobs` on a base-model sampling client) and each token's advantage gets
   `- kl_coef * (log q(token) - log p_base(token))`, q being the sampler;
4. one `forward_backward` with `importance_sampling` (or `ppo` / `cispo`), one `optim_step`.

Advantages are divided by the number of sampled sequences (P·G), so the summed loss is a mean over
sequences and the learning rate does not depend on the batch size.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from framework import types
from launcher.recipes.base import OnPolicyRecipe, decode, sequence_datum

POLICY_LOSSES = ("importance_sampling", "ppo", "cispo")


class RLRecipe(OnPolicyRecipe):
    section: ClassVar[str] = "rl"
    plot_keys: ClassVar[tuple[str, ...]] = ("reward/mean", "eval/accuracy", "loss", "kl/base", "completion/tokens",
                                            "time/step")
    progress_key: ClassVar[str] = "reward/mean"

    def prepare(self) -> dict[str, float]:
        rl = self.cfg.rl
        if rl.loss_fn not in POLICY_LOSSES:
            raise ValueError(f"rl.loss_fn must be one of {POLICY_LOSSES}, got {rl.loss_fn!r}")
        self.base_sampler = (self.ctx.service.create_sampling_client(base_model=self.ctx.base_model)
                             if rl.kl_coef > 0 else None)
        return super().prepare()

    def step(self, step: int, adam: types.AdamParams) -> dict[str, float]:
        rl, env, tok = self.cfg.rl, self.env, self.tokenizer
        t0 = time.perf_counter()
        problems, prompts, groups = self.sample(step)
        t_sample = time.perf_counter() - t0

        rewards = np.array([[env.grade(p, decode(tok, s.tokens)) for s in seqs]
                            for p, seqs in zip(problems, groups, strict=True)], np.float64)  # [P, G]
        advantages = rewards - rewards.mean(axis=1, keepdims=True)
        if rl.scale_by_std:
            advantages = advantages / (rewards.std(axis=1, keepdims=True) + 1e-6)
        kl = self._kl_to_base(prompts, groups) if self.base_sampler is not None else None
        scale = 1.0 / rewards.size
        datums, kl_values = [], []
        for i, (prompt, seqs) in enumerate(zip(prompts, groups, strict=True)):
            if kl is None and np.all(advantages[i] == 0):
                continue
            for j, seq in enumerate(seqs):
                token_adv = np.full(len(seq.tokens), advantages[i, j])
                if kl is not None:
                    token_adv = token_adv - rl.kl_coef * kl[i][j]
                    kl_values.append(kl[i][j])
                datums.append(sequence_datum(prompt, seq.tokens, logprobs=seq.logprobs, advantages=token_adv * scale))

        t1 = time.perf_counter()
        metrics: dict[str, float] = {}
        if datums:
            fb = self.trainer.forward_backward(datums, rl.loss_fn, dict(rl.loss_fn_config) or None)
            optim = self.trainer.optim_step(adam)
            out, opt = fb.result(), optim.result()
            metrics["loss"] = out.metrics["loss:sum"]
            metrics["sampler_logprob_gap"] = out.metrics.get("sampler_logprob_gap:mean", float("nan"))
            metrics["grad_norm"] = (opt.metrics or {}).get("grad_norm:mean", float("nan"))
        t_train = time.perf_counter() - t1

        lengths = [len(s.tokens) for seqs in groups for s in seqs]
        mixed = float(np.mean([np.any(a != 0) for a in advantages]))
        metrics.update({
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "groups/mixed": mixed, "datums": len(datums), "completion/tokens": float(np.mean(lengths)),
            "time/sample": t_sample, "time/train": t_train,
            "tokens": float(sum(len(p) * rl.group_size for p in prompts) + sum(lengths)
                            + sum(d.model_input.length for d in datums)),
        })
        if kl is not None:
            metrics["kl/base"] = float(np.mean([v.mean() for v in kl_values])) if kl_values else 0.0
        return metrics

    def _kl_to_base(self, prompts: list[list[int]], groups: list[list[types.SampledSequence]]
                    ) -> list[list[np.ndarray]]:
        """Per sampled token: log q(token) − log p_base(token) (the sampled estimate of KL(q‖base))."""
        futures = [[self.base_sampler.compute_logprobs(types.ModelInput.from_ints(prompt + s.tokens)) for s in seqs]
                   for prompt, seqs in zip(prompts, groups, strict=True)]
        out = []
        for prompt, seqs, futs in zip(prompts, groups, futures, strict=True):
            row = []
            for s, f in zip(seqs, futs, strict=True):
                base = np.asarray(f.result()[len(prompt):], np.float64)
                row.append(np.asarray(s.logprobs, np.float64) - base)
            out.append(row)
        return out
