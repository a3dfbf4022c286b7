"""The launcher's recipes, unchanged, against the server: `client=remote client.base_url=...`.

An RL run on the embedded model through `framework.remote` (the official SDK underneath): it trains,
evaluates, saves its checkpoints on the server (`tinker://` paths in latest.json, the older one
deleted there), and downloads its final adapter as a PEFT directory. Then a run killed mid-way
resumes from its server-side checkpoint and finishes.

(Exact equality of a resumed run is tested in-process by tests/test_resume.py and over the wire by
tests/test_service_restart.py. An RL run over the wire is not bitwise repeatable: which requests share
an engine batch depends on arrival timing, the sampler's logprobs move with a batch's composition at
the ~1e-5 level, and a rare sampled token can flip and change the trajectory.)
"""

from __future__ import annotations

import json

import tinker
from launcher_utils import compose_config, run_overrides
from safetensors.numpy import load_file
from service_utils import EMBEDDED

from framework.tracking import read_metrics
from launcher.run import run

SETTINGS = ["max_steps=4", "save_every=2", "eval_every=3", "keep_checkpoints=1", "logger=jsonl",
            "logger.progress=false"]


def test_recipe_runs_remotely_and_resumes(service_server, tmp_path):
    key = service_server.key("launcher-user")

    def config(*extra: str):
        overrides = run_overrides("rl_math", EMBEDDED, tmp_path / "xla", *SETTINGS, "compilation_cache=null",
                                  "client=remote", f"client.base_url={service_server.url}", f"client.api_key={key}",
                                  *extra)
        return compose_config(overrides)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(config(), whole)
    rows = read_metrics(whole)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "eval/accuracy" in rows[-1]
    assert any(r.get("datums", 0) > 0 for r in rows)  # trained on the server
    latest = json.loads((whole / "checkpoints" / "latest.json").read_text())
    assert latest["completed_steps"] == 4 and latest["path"].startswith("tinker://")
    rest = tinker.RestClient(base_url=service_server.url, api_key=key)
    run_id = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(latest["path"]).training_run_id
    names = {c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert names == {"weights/step_000004", "sampler_weights/final"}  # step 2 rotated out (keep_checkpoints=1)
    adapter = whole / "final_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert load_file(adapter / "adapter_model.safetensors")

    run(config("stop_after=3"), killed)
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2]
    run(config("resume=true"), killed)
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2, 3, 4]
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["completed_steps"] == 4
    assert load_file(killed / "final_adapter" / "adapter_model.safetensors").keys() == load_file(
        adapter / "adapter_model.safetensors").keys()
