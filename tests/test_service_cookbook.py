"""The official tinker-cookbook (0.6.1), unchanged, trains against our server offline.

`tinker_cookbook.recipes.math_rl.train env=arithmetic` on the embedded tiny model, as a user runs it
(a subprocess with its own SDK), for two RL steps with the `importance_sampling` loss: it samples
with the string stop sequence of the `role_colon` renderer, trains, and saves a final training
checkpoint and sampler weights, whose `tinker://` paths must then be listed and usable.
"""

from __future__ import annotations

import json
import subprocess
import sys

import tinker
from service_utils import EMBEDDED, sdk_env
from tinker import types


def test_math_rl_recipe_runs_unchanged(service_server, tmp_path):
    key = service_server.key("cookbook-user")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tinker_cookbook.recipes.math_rl.train", f"model_name={EMBEDDED}",
               "renderer_name=role_colon", f"base_url={service_server.url}", "env=arithmetic", "group_size=2",
               "groups_per_batch=2", "max_tokens=5", "lora_rank=4", "max_steps=2", "eval_every=0", "save_every=0",
               "loss_fn=importance_sampling", f"log_path={run_dir}", "behavior_if_log_dir_exists=delete"]
    done = subprocess.run(command, cwd=tmp_path, env={**sdk_env(), "TINKER_API_KEY": key}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Training completed successfully" in done.stdout + done.stderr

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "env/all/total_episodes" in r]
    assert [r["step"] for r in steps] == [0, 1] and all(r["env/all/total_episodes"] == 4 for r in steps)
    assert all(r["env/all/ac_tokens_per_turn"] <= 5 for r in steps)
    final = [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()][-1]
    assert final["name"] == "final"
    assert final["state_path"].startswith("tinker://") and final["sampler_path"].startswith("tinker://")

    # what the recipe saved is the user's, listed, and loadable
    rest = tinker.RestClient(base_url=service_server.url, api_key=key)
    run = rest.get_training_run_by_tinker_path(final["state_path"]).result()
    listed = {c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints}
    assert {final["state_path"], final["sampler_path"]} <= listed
    sdk = tinker.ServiceClient(base_url=service_server.url, api_key=key)
    sampler = sdk.create_sampling_client(model_path=final["sampler_path"]).result()
    out = sampler.sample(types.ModelInput.from_ints([1, 30, 31]), 1, types.SamplingParams(max_tokens=3, seed=0))
    assert len(out.result().sequences[0].tokens) >= 1
    resumed = sdk.create_training_client_from_state_with_optimizer(final["state_path"]).result()
    assert resumed.get_info().lora_rank == 4
    sdk.close("success").result()
