"""`qlora-kernels finetune` on a tiny random Llama (SmolLM2's tokenizer and template, the
default chatterbot-corpus data): the held-out loss drops, the outputs are complete, the
adapter loads with stock PEFT, and a run killed mid-way (SIGINT, SIGKILL) then resumed
ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import signal
import time

import pytest
import torch

from .finetune_helpers import (TINY_ARGS, adapter_tensors, build_tiny_model, checkpoint_step, metrics, run_inproc,
                               spawn)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference_runs(tiny_dir, tmp_path_factory):
    """Uninterrupted runs, one per method the kill tests use: the yardsticks."""
    runs = {}
    for method in ("qlora", "dora"):
        out = tmp_path_factory.mktemp(f"ref-{method}")
        rc, _, _ = run_inproc(["--model", str(tiny_dir), "--method", method, "--output", str(out), *TINY_ARGS])
        assert rc == 0
        runs[method] = out
    return runs


def test_tiny_run_learns_and_writes_everything(reference_runs):
    out = reference_runs["qlora"]
    m = metrics(out)
    assert m["heldout"]["after"]["loss"] < m["heldout"]["before"]["loss"] - 0.5, m["heldout"]
    assert [r["step"] for r in m["losses"]] == list(range(1, 25))
    assert m["train"]["tokens_per_second"] > 0 and m["peak_rss_mb"] > 0
    assert m["backend"]["backend"] == "cpu" and m["config"]["method"] == "qlora"
    assert m["versions"]["torch"] and m["versions"]["peft"]
    assert len(m["samples"]["before"]) == len(m["samples"]["after"]) == 2
    for name in ("adapter_model.safetensors", "adapter_config.json", "loss.png", "checkpoint/state.json",
                 "checkpoint/optimizer.pt", "checkpoint/adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # no scratch files left behind


def test_progress_bar_and_report(tiny_dir, tmp_path, capsys):
    rc, out, err = run_inproc(["--model", str(tiny_dir), "--output", str(tmp_path / "o"), "--method", "lora",
                               *TINY_ARGS[:-2], "--steps", "3"], capsys)
    assert rc == 0, err
    assert "tok/s" in err and "3/3" in err  # tqdm: steps, rate, ETA
    assert "held-out loss before" in out and "held-out loss after" in out and "samples after:" in out


def test_adapter_loads_with_stock_peft(tiny_dir, tmp_path, capsys):
    """A LoRA run on the dense base: stock PEFT's PeftModel.from_pretrained on the same base
    reproduces our trained model's logits (our fused layers vs PEFT's own)."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from qlora_kernels.finetune import model as M

    out = tmp_path / "lora"
    rc, _, err = run_inproc(["--model", str(tiny_dir), "--method", "lora", "--output", str(out), *TINY_ARGS[:-2],
                             "--steps", "4", "--samples", "0"], capsys)
    assert rc == 0, err
    saved = adapter_tensors(out)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    stock.eval()
    state = {k: v for k, v in stock.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) and len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for k, v in saved.items():
        assert torch.equal(state[k.replace(".weight", ".default.weight")], v), k
    ours = M.prepare(AutoModelForCausalLM.from_pretrained(tiny_dir), "lora", 16, 32, 0.05, M.LLAMA_TARGETS)
    set_peft_model_state_dict(ours, saved)
    ours.eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits, ours(input_ids=ids).logits
        base = stock.get_base_model()
        with stock.disable_adapter():
            plain = base(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter does something


def test_qlora_and_dora_adapters_load_with_stock_peft(reference_runs, tiny_dir):
    """Stock PEFT on the plain fp32 base reads every saved tensor back unchanged."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    for method, out in reference_runs.items():
        saved = adapter_tensors(out)
        stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
        loaded = get_peft_model_state_dict(stock)
        assert loaded.keys() == saved.keys(), method
        for k, v in saved.items():
            assert torch.equal(loaded[k], v), (method, k)
        assert any("lora_magnitude_vector" in k for k in saved) == (method == "dora")


def _kill_and_resume(tiny_dir, out, method, sig, at_least, capsys):
    """Starts a run, signals it once a checkpoint at step >= at_least exists, then resumes."""
    args = ["--model", str(tiny_dir), "--method", method, "--output", str(out), *TINY_ARGS]
    p = spawn(args, {"QLORA_KERNELS_FINETUNE_STEP_DELAY": "0.25"})
    deadline = time.monotonic() + 120
    while checkpoint_step(out) < at_least:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    stopped_at = checkpoint_step(out)
    assert 0 < stopped_at < 24, stopped_at
    rc, text, err2 = run_inproc(["--output", str(out), "--resume"], capsys)
    assert rc == 0, err2
    assert f"resuming at step {stopped_at}/24" in text
    return p.returncode, err, stopped_at


def _assert_same_run(out, ref):
    a, b = metrics(out), metrics(ref)
    assert [r["loss"] for r in a["losses"]] == [r["loss"] for r in b["losses"]]
    assert [r["lr"] for r in a["losses"]] == [r["lr"] for r in b["losses"]]
    assert a["heldout"]["before"] == b["heldout"]["before"] and a["heldout"]["after"] == b["heldout"]["after"]
    ta, tb = adapter_tensors(out), adapter_tensors(ref)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit-identical, not merely close


def test_sigint_then_resume_equals_uninterrupted(tiny_dir, reference_runs, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err, step = _kill_and_resume(tiny_dir, out, "qlora", signal.SIGINT, 6, capsys)
    assert rc == 130, err
    assert "SIGINT" in err and "--resume" in err and "Traceback" not in err
    assert metrics(out)["resumed_from_steps"] == [step]
    _assert_same_run(out, reference_runs["qlora"])


def test_sigkill_then_resume_equals_uninterrupted(tiny_dir, reference_runs, tmp_path, capsys):
    """SIGKILL cannot be caught: the run resumes from the last periodic checkpoint."""
    out = tmp_path / "run"
    rc, _, step = _kill_and_resume(tiny_dir, out, "dora", signal.SIGKILL, 8, capsys)
    assert rc == -signal.SIGKILL
    assert step % 4 == 0  # a --save-every 4 checkpoint
    _assert_same_run(out, reference_runs["dora"])


def test_resume_refuses_changed_options(reference_runs, capsys):
    rc, _, err = run_inproc(["--output", str(reference_runs["qlora"]), "--resume", "--lr", "0.5"], capsys)
    assert rc != 0 and "--lr 0.5 differs" in err and err.count("\n") == 1


def test_resume_refuses_other_dropout_masks(reference_runs, capsys, monkeypatch):
    """A run drew its masks one way (the native default); resuming it with torch's masks would
    not continue it bit for bit."""
    monkeypatch.setenv("QLORA_KERNELS_DROPOUT", "torch")
    rc, _, err = run_inproc(["--output", str(reference_runs["qlora"]), "--resume"], capsys)
    assert rc != 0 and "QLORA_KERNELS_DROPOUT=native" in err and err.count("\n") == 1, err


def test_reply_only_labels_for_every_record_kind(tiny_dir):
    """Labels cover exactly the assistant turns (template end-of-turn included), never the
    system/user part; plain text is labelled throughout."""
    from transformers import AutoTokenizer

    from qlora_kernels.finetune import data

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    conv = data.Record(messages=[{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Smol."}])
    e = data.encode(tok, conv, 256)
    labelled = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != data.IGNORE])
    assert labelled == "Hello!<|im_end|>\nSmol.<|im_end|>\n"
    full = tok.apply_chat_template(conv.messages, tokenize=False)
    assert tok.decode(e.input_ids) == full  # the same text the template renders
    assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n") and e.prompt == "Hi there"
    t = data.encode(tok, data.Record(text="plain words here"), 256)
    assert t.labels == t.input_ids and t.input_ids[-1] == tok.eos_token_id
    assert data.encode(tok, conv, 20) is None  # the first prompt alone exceeds 20 tokens


def test_jsonl_data_of_all_kinds_with_epochs(tiny_dir, tmp_path, capsys):
    import json

    f = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(12)]
    rows += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}"},
                           {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe")]
    rows += [{"text": "A line of plain text to continue."}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "o"
    rc, text, err = run_inproc(["--model", str(tiny_dir), "--data", str(f), "--output", str(out), "--epochs", "2",
                                "--batch-size", "4", "--grad-accum", "1", "--eval-size", "3", "--samples", "1",
                                "--max-new-tokens", "4"],
                               capsys)
    assert rc == 0, err
    m = metrics(out)
    assert m["examples"] == {"unique": 16, "duplicates_dropped": 0, "train": 13, "heldout": 3}
    assert m["config"]["steps"] == 7 and len(m["losses"]) == 7  # ceil(2 epochs * 13 / 4)
    assert "d.jsonl: 16 unique examples" in text


class _TopKRouter(torch.nn.Linear):  # PhiMoE's and Llama 4's routers subclass nn.Linear
    pass


class _OwnForwardLinear(torch.nn.Linear):  # Falcon's FalconLinear: its own forward
    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_targets_leave_routers_and_vision_towers_alone():
    # A router became a LoRA target (PhiMoE's returns a tuple: PEFT's layer failed at step 0),
    # and a vision tower's q/k/v_proj were adapted in a text fine-tune (Gemma 3).
    from qlora_kernels.finetune import model as M

    nn = torch.nn
    m = nn.Module()
    m.language_model = nn.ModuleDict({"fc": nn.Linear(8, 8), "out_proj": nn.Linear(8, 8), "router": nn.Linear(8, 2),
                                      "shared_expert_gate": nn.Linear(8, 1), "moe": _TopKRouter(8, 4)})
    m.vision_tower = nn.ModuleDict({"out_proj": nn.Linear(8, 8), "fc_vis": nn.Linear(8, 8)})
    assert M.find_targets(m) == ["fc", "out_proj"]
    assert M.excluded_modules(m) == ["vision_tower.fc_vis", "vision_tower.out_proj"]


def test_qlora_refuses_a_model_with_nothing_to_quantize():
    # Falcon's projections (FalconLinear) were left dense with no word, and the run trained
    # a dense base while printing "qlora (NF4 base)"
    import qlora_kernels as qk
    from qlora_kernels.finetune import FinetuneError
    from qlora_kernels.finetune import model as M

    model = torch.nn.Sequential(_OwnForwardLinear(8, 8))
    with pytest.warns(UserWarning, match="left layers of _OwnForwardLinear dense"):
        with pytest.raises(FinetuneError, match="nothing was quantized to NF4; use --method lora"):
            M.prepare(model, "qlora", 4, 8, 0.0, ["0"])
    mixed = torch.nn.Sequential(_OwnForwardLinear(8, 8), torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="left layers of _OwnForwardLinear dense"):
        qk.quantize_model(mixed)
    assert isinstance(mixed[1], qk.nn.Linear4bit) and type(mixed[0]) is _OwnForwardLinear
