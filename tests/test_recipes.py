"""Each recipe end to end on a tiny model, a few steps: the run directory holds everything promised."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from launcher_utils import (  # noqa: F401  (fixtures)
    SHORT,
    _restore_jax_cache_config,
    compose_config,
    model_path,
    run_overrides,
    xla_cache,
)

from framework.tracking import read_metrics
from launcher.jsonl import DataFileError
from launcher.recipes.sl import load_chats
from launcher.run import run

MAIN_METRIC = {"rl_math": "reward/mean", "sl_chat": "loss", "dpo": "dpo/accuracy", "distill": "distill/reverse_kl"}
EVAL_METRIC = {"rl_math": "eval/accuracy", "sl_chat": "eval/loss", "dpo": "eval/dpo_accuracy",
               "distill": "eval/accuracy"}


def check_run_dir(run_dir, steps: int, eval_every: int) -> list[dict]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))  # one row per step + the final evaluation
    for r in rows[:-1]:
        assert r["lr"] > 0 and r["time/step"] > 0 and r["tokens/s"] > 0
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
    adapter = run_dir / "final_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["completed_steps"] == steps
    return rows


@pytest.mark.parametrize("experiment", ["rl_math", "sl_chat", "dpo", "distill"])
def test_recipe_end_to_end(experiment, model_path, xla_cache, tmp_path):  # noqa: F811
    cfg = compose_config(run_overrides(experiment, model_path, xla_cache))
    result = run(cfg, tmp_path / "run")
    rows = check_run_dir(tmp_path / "run", cfg.max_steps, cfg.eval_every)
    key, eval_key = MAIN_METRIC[experiment], EVAL_METRIC[experiment]
    assert all(math.isfinite(r[key]) for r in rows[:-1])
    evals = [r[eval_key] for r in rows if eval_key in r]
    assert len(evals) == 3 and result == evals[-1]  # steps 0 and 2, and the final one
    if experiment == "sl_chat":
        assert evals[-1] < evals[0]  # held-out loss falls
    if experiment == "dpo":
        assert evals[0] == 0.0 < evals[-1]  # the policy starts as the reference: no margin, then some
        assert rows[-1]["eval/dpo_margin"] > rows[0]["eval/dpo_margin"]
    if experiment == "distill":
        assert "teacher/eval_accuracy" in rows[0] and (tmp_path / "run" / "teacher_adapter").is_dir()
        assert rows[-2][key] < rows[0][key]  # the student moves toward the teacher
        # The saved teacher, given as distill.teacher_adapter, is the same teacher (nothing retrained).
        teacher = tmp_path / "run" / "teacher_adapter"
        again = compose_config(run_overrides(experiment, model_path, xla_cache, "max_steps=1", "save_every=0",
                                             f"distill.teacher_adapter={teacher}"))
        run(again, tmp_path / "again")
        assert read_metrics(tmp_path / "again")[0]["teacher/eval_accuracy"] == rows[0]["teacher/eval_accuracy"]
        assert not (tmp_path / "again" / "teacher_adapter").exists()


def test_rl_math_learns(xla_cache, tmp_path):  # noqa: F811
    """The default experiment, shortened to 30 steps, on the embedded model: held-out accuracy rises."""
    cfg = compose_config(["+experiment=rl_math", "max_steps=30", "eval_every=30", "save_every=0",
                          f"compilation_cache={xla_cache}", "logger.progress=false", "logger=jsonl"])
    final = run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    initial = rows[0]["eval/accuracy"]
    assert 0.05 <= initial <= 0.4 and final >= initial + 0.15, (initial, final)
    rewards = [r["reward/mean"] for r in rows[:-1]]
    assert np.mean(rewards[-10:]) >= np.mean(rewards[:10]) + 0.1


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo"])
def test_rl_other_losses_with_kl_to_base(loss_fn, model_path, xla_cache, tmp_path):  # noqa: F811
    """PPO / CISPO train, and the KL penalty to the base model is measured: zero while the policy is the base."""
    cfg = compose_config(run_overrides("rl_math", model_path, xla_cache, f"rl.loss_fn={loss_fn}", "rl.kl_coef=0.05",
                                       "max_steps=2", "save_every=0", "logger=jsonl", "optim.learning_rate=0.01"))
    run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert abs(rows[0]["kl/base"]) < 1e-4  # step 0 samples from the base weights themselves
    assert rows[1]["kl/base"] != rows[0]["kl/base"] and math.isfinite(rows[1]["kl/base"])
    assert all(math.isfinite(r["loss"]) for r in rows[:-1])


def test_rl_unknown_loss_is_named(model_path, xla_cache, tmp_path):  # noqa: F811
    cfg = compose_config(run_overrides("rl_math", model_path, xla_cache, "rl.loss_fn=reinforce"))
    with pytest.raises(ValueError, match=r"rl\.loss_fn must be one of"):
        run(cfg, tmp_path / "run")


@pytest.mark.parametrize(("line", "message"), [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}', "not valid JSON"),
    ('{"messages": [{"role": "user"}]}', "expected"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('["messages"]', "expected"),
])
def test_bad_chat_file_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(DataFileError, match=message) as error:
        load_chats(path)
    assert f"{path}:3:" in str(error.value)
    path.write_text(f"{good}\n\n{good}\n")  # blank lines are skipped
    assert load_chats(path) == 2 * [[{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]]


def test_cli_multirun_gives_each_job_its_own_directory(model_path, xla_cache, tmp_path):  # noqa: F811
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "--multirun", "+experiment=sl_chat", f"model.path={model_path}",
         "lora.rank=1,2", "max_steps=1", "save_every=0", "sl.batch_size=4", "sl.eval_size=4", "logger=jsonl",
         "logger.progress=false", f"compilation_cache={xla_cache}", "runs_root=out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "out" / "sl_chat").glob("multirun-*")
    for number, rank in ((0, 1), (1, 2)):
        (job,) = sweep.glob(f"{number}_lora.rank={rank},max_steps=1,*")  # <job number>_<overrides>
        adapter = json.loads((job / "final_adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == rank
        assert [r["step"] for r in read_metrics(job)] == [0, 1]


@pytest.mark.parametrize(("model", "spec", "experiment"), [
    ("llama3_2_1b", "llama3_rope_scaling", "rl_math"),
    ("qwen2_5_0_5b", "qwen2_tied", "sl_chat"),
])
def test_named_model_groups_train_a_hugging_face_checkpoint(
        model, spec, experiment, tiny_checkpoint, xla_cache, tmp_path):  # noqa: F811
    """`model=<name> model.path=<dir>` loads another architecture's checkpoint through the same path a real
    Llama 3 / Qwen2.5 takes (here tiny random ones with their own tokenizer and chat template)."""
    path = tiny_checkpoint(spec)
    cfg = compose_config([f"+experiment={experiment}", f"model={model}", f"model.path={path}",
                          f"compilation_cache={xla_cache}", "logger.progress=false", "logger=jsonl",
                          *SHORT[experiment], "max_steps=2", "save_every=0"])
    assert cfg.model.name == model and cfg.model.dtype == "auto"
    run(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows[:-1] if "loss" in r)
    adapter = json.loads((tmp_path / "run" / "final_adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(path)
    modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert modules <= set(adapter["target_modules"])
