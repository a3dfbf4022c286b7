"""The Hydra config tree: composition, typed overrides, the embedded model path, run directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from launcher_utils import REPO, compose_config
from omegaconf import MissingMandatoryValue, OmegaConf

from framework.tracking import wandb_mode
from launcher.config import CHECKPOINTS_DIR, run_dir
from launcher.run import ConfigError, learning_rate, make_env, make_service

EXPERIMENTS = {"rl_math": "rl", "sl_chat": "sl", "dpo": "dpo", "distill": "distill", "pretrain_tiny": "pretrain"}


@pytest.mark.parametrize(("experiment", "recipe"), EXPERIMENTS.items())
def test_every_experiment_composes(experiment, recipe):
    cfg = compose_config([f"+experiment={experiment}"])
    assert cfg.recipe == recipe and cfg.name == experiment
    assert cfg.model.name == "tiny" and cfg.client.kind == "local" and cfg.logger.wandb.mode is None
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every value resolves


def test_default_model_is_the_embedded_one_inside_the_package():
    import launcher

    cfg = compose_config(["+experiment=rl_math"])
    assert Path(cfg.model.path) == Path(launcher.__file__).parent / "assets" / "tiny-arith"


def test_overrides_are_typed_and_checked():
    cfg = compose_config(["+experiment=rl_math", "lora.rank=4", "rl.loss_fn=ppo", "env=math", "logger=jsonl",
                          "+rl.loss_fn_config.clip_low_threshold=0.7", "optim.learning_rate=1e-4"])
    assert cfg.lora.rank == 4 and cfg.rl.loss_fn == "ppo" and cfg.rl.loss_fn_config == {"clip_low_threshold": 0.7}
    assert cfg.env.name == "math" and cfg.optim.learning_rate == 1e-4 and cfg.logger.wandb.mode == "disabled"
    with pytest.raises(ConfigCompositionException, match="rnak"):
        compose_config(["+experiment=rl_math", "lora.rnak=4"])
    with pytest.raises(ConfigCompositionException, match=r"lora\.rank"):
        compose_config(["+experiment=rl_math", "lora.rank=many"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["+experiment=no_such_experiment"])


def test_real_models_need_a_path():
    cfg = compose_config(["+experiment=rl_math", "model=qwen3_8b"])
    with pytest.raises(MissingMandatoryValue, match=r"model\.path"):
        _ = cfg.model.path
    cfg = compose_config(["+experiment=sl_chat", "model=llama3_2_1b", "model.path=/ckpt/Llama-3.2-1B-Instruct"])
    assert cfg.model.path == "/ckpt/Llama-3.2-1B-Instruct" and cfg.model.dtype == "auto"


def test_remote_client_without_a_server_fails_clearly(tmp_path, monkeypatch):
    """A dead port is refused up front, in one line (the SDK itself would retry it for minutes)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = compose_config(["+experiment=rl_math", "client=remote", f"client.base_url=http://127.0.0.1:{port}",
                          "client.api_key=tml-x"])
    with pytest.raises(ConfigError, match=f"no tinker server answers at http://127.0.0.1:{port}"):
        make_service(cfg, tmp_path)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    no_key = compose_config(["+experiment=rl_math", "client=remote", f"client.base_url=http://127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match=r"client\.api_key"):
        make_service(no_key, tmp_path)


def test_run_dir_resolver(tmp_path):
    root = tmp_path / "rl_math"
    assert run_dir(False, str(root), "2025-01-01_00-00-00") == f"{root}/2025-01-01_00-00-00"
    with pytest.raises(ValueError, match="no run with a checkpoint"):
        run_dir(True, str(root), "now")
    for name in ("2025-01-01_00-00-00", "2025-01-02_00-00-00", "2025-01-03_00-00-00"):
        (root / name / CHECKPOINTS_DIR).mkdir(parents=True)
    for name in ("2025-01-01_00-00-00", "2025-01-02_00-00-00"):  # the newest run never saved
        (root / name / CHECKPOINTS_DIR / "latest.json").write_text("{}")
    assert run_dir("true", str(root), "now") == str(root / "2025-01-02_00-00-00")


def test_wandb_is_offline_unless_asked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(None) == "online" and wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode"):
        wandb_mode("onlin")


def test_learning_rate_schedules():
    cfg = compose_config(["optim.learning_rate=1.0", "optim.warmup_steps=2", "optim.schedule=linear"]).optim
    assert [learning_rate(cfg, s, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cfg.schedule = "cosine"
    assert learning_rate(cfg, 2, 6) == 1.0 and learning_rate(cfg, 4, 6) == pytest.approx(0.5)


def test_env_from_config():
    env = make_env(compose_config(["env.difficulty.max_digits=3", "env.difficulty.operators=[+,*]"]).env)
    assert env.difficulty.max_digits == 3 and env.difficulty.operators == ("+", "*")
    assert type(make_env(compose_config(["env=math"]).env)).__name__ == "MathEnv"


def test_cli_composes_from_another_directory(tmp_path):
    """The entry point finds its config tree as package data, whatever the working directory."""
    out = subprocess.run([sys.executable, "-m", "launcher", "+experiment=dpo", "dpo.beta=0.5", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.recipe == "dpo" and cfg.dpo.beta == 0.5
    assert not (tmp_path / "runs").exists() and Path.cwd() != REPO / "conf"
    bad = subprocess.run([sys.executable, "-m", "launcher", "+experiment=dpo", "dpo.betta=0.5"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "betta" in bad.stderr


@pytest.mark.parametrize(("overrides", "needles"), [
    (["model=qwen3_0_6b"], ["model.path", "nothing is downloaded"]),
    (["model.path=/no/such/checkpoint"], ["/no/such/checkpoint", "does not exist"]),
    (["env=math", "env.path=/no/such/file.jsonl"], ["/no/such/file.jsonl"]),
    (["client=remote"], ["client.base_url"]),
], ids=["no-model-path", "bad-model-path", "bad-data-file", "remote-without-url"])
def test_first_mistakes_end_in_one_clear_line(tmp_path, overrides, needles):
    """What a new user gets wrong first stops the run before anything is written, with one line on
    stderr that says what to set, not a traceback."""
    out = subprocess.run([sys.executable, "-m", "launcher", "+experiment=rl_math", *overrides, "logger=jsonl"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in out.stdout + out.stderr
