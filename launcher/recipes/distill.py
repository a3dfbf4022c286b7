"""On-policy distillation: the student samples, the teacher scores every sampled token.

Per sampled token the advantage is `log p_teacher(token) − log p_student(token)`: minus the
per-token estimate of the reverse KL(student ‖ teacher) on the student's own samples. Training on
it with the `importance_sampling` loss (divided by the number of sequences) moves the student
toward the teacher where the student actually goes, as in Agarwal et al. 2024 and Thinking
Machines' "On-policy distillation" post. Teacher logprobs come from `compute_logprobs` on the
teacher's sampling client: only the client API is used.

The teacher, by config:
- `distill.teacher_adapter`: an adapter saved by `save_weights_for_sampler` (a PEFT directory with
  tinker-jax's adapter.json), on `distill.teacher_base_model` or the student's base model;
- `distill.teacher_base_model` alone: another checkpoint with the same tokenizer, no adapter;
- neither (the default, which works offline with the embedded model): a teacher is first trained
  here by SFT on the env's reference answers (`teacher_sl_steps` steps) and saved in
  `<run>/teacher_adapter`; a resumed run reuses that directory, so both runs distill from the
  same teacher.

Metrics: `distill/reverse_kl` (mean over sampled tokens, falls as the student matches the teacher),
`reward/mean` of the student's samples, `eval/accuracy` (greedy, held-out), and the teacher's own
greedy accuracy in the first row (`teacher/eval_accuracy`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from framework import types
from launcher.recipes.base import OnPolicyRecipe, decode, greedy_accuracy, sequence_datum
from launcher.recipes.sl import chat_datums, env_chat

log = logging.getLogger(__name__)

TEACHER_DIR = "teacher_adapter"
TEACHER_DATA_OFFSET = 10**6  # the teacher's SFT batches use env steps the student never sees


class DistillRecipe(OnPolicyRecipe):
    section: ClassVar[str] = "distill"
    plot_keys: ClassVar[tuple[str, ...]] = ("distill/reverse_kl", "eval/accuracy", "reward/mean", "loss",
                                            "time/step")
    progress_key: ClassVar[str] = "distill/reverse_kl"

    def prepare(self) -> dict[str, float]:
        super().prepare()
        d, service = self.cfg.distill, self.ctx.service
        teacher_base = str(Path(d.teacher_base_model).expanduser().absolute()) if d.teacher_base_model \
            else self.ctx.base_model
        if d.teacher_adapter:
            self.teacher = service.create_sampling_client(model_path=d.teacher_adapter, base_model=teacher_base)
        elif d.teacher_base_model:
            self.teacher = service.create_sampling_client(base_model=teacher_base)
        else:
            path = self.ctx.run_dir / TEACHER_DIR
            if not (path / "adapter_config.json").is_file():
                self._train_teacher(path)
            self.teacher = service.create_sampling_client(model_path=str(path))
        if not self.eval_set:
            return {}
        return {"teacher/eval_accuracy": greedy_accuracy(self.teacher, self.tokenizer, self.env, self.eval_set,
                                                         max_tokens=d.max_tokens, stop=self.stop)}

    def _train_teacher(self, out: Path) -> None:
        """SFT a teacher adapter on the env's reference answers and save it (PEFT) to `out`."""
        d, lora = self.cfg.distill, self.cfg.lora
        teacher = self.ctx.service.create_lora_training_client(
            self.ctx.base_model, rank=lora.rank, seed=lora.seed + 1, train_attn=lora.train_attn,
            train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)
        adam = types.AdamParams(learning_rate=d.teacher_sl_learning_rate, beta1=self.cfg.optim.beta1,
                                beta2=self.cfg.optim.beta2, eps=self.cfg.optim.eps,
                                grad_clip_norm=self.cfg.optim.grad_clip_norm)
        loss = float("nan")
        for s in range(d.teacher_sl_steps):
            chats = [env_chat(self.env, p) for p in self.env.problems(TEACHER_DATA_OFFSET + s,
                                                                      d.teacher_sl_batch_size)]
            datums, _ = chat_datums(self.tokenizer, chats)
            fb = teacher.forward_backward(datums, "cross_entropy")
            teacher.optim_step(adam).result()
            loss = fb.result().metrics["loss:sum"]
        saved = Path(teacher.save_weights_for_sampler("teacher").result().path)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(saved, out)
        log.info("trained the teacher adapter: %d SFT steps, last loss %.3f, saved to %s", d.teacher_sl_steps,
                 loss, out)

    def step(self, step: int, adam: types.AdamParams) -> dict[str, float]:
        env, tok = self.env, self.tokenizer
        t0 = time.perf_counter()
        problems, prompts, groups = self.sample(step)
        scored = [[self.teacher.compute_logprobs(types.ModelInput.from_ints(prompt + s.tokens)) for s in seqs]
                  for prompt, seqs in zip(prompts, groups, strict=True)]
        t_sample = time.perf_counter() - t0

        scale = 1.0 / sum(len(seqs) for seqs in groups)
        datums, kls, rewards = [], [], []
        for problem, prompt, seqs, futs in zip(problems, prompts, groups, scored, strict=True):
            for seq, fut in zip(seqs, futs, strict=True):
                teacher_lp = np.asarray(fut.result()[len(prompt):], np.float64)
                student_lp = np.asarray(seq.logprobs, np.float64)
                kls.append(student_lp - teacher_lp)
                rewards.append(env.grade(problem, decode(tok, seq.tokens)))
                datums.append(sequence_datum(prompt, seq.tokens, logprobs=seq.logprobs,
                                             advantages=(teacher_lp - student_lp) * scale))
        t1 = time.perf_counter()
        fb = self.trainer.forward_backward(datums, "importance_sampling")
        optim = self.trainer.optim_step(adam)
        out, opt = fb.result(), optim.result()
        all_kl = np.concatenate(kls)
        return {"distill/reverse_kl": float(all_kl.mean()), "reward/mean": float(np.mean(rewards)),
                "loss": out.metrics["loss:sum"], "grad_norm": (opt.metrics or {}).get("grad_norm:mean"),
                "completion/tokens": float(np.mean([len(s.tokens) for seqs in groups for s in seqs])),
                "time/sample": t_sample, "time/train": time.perf_counter() - t1,
                "tokens": float(sum(d.model_input.length for d in datums) + all_kl.size)}
