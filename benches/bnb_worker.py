"""One side of benches/test_bench_bnb.py: a process with bitsandbytes stock
(QLORA_KERNELS_BNB=0) or with our backend plugin (=1), which builds the benchmark cases on
the same seeded inputs and times them on request. Two such processes stay alive side by
side and are asked for rounds in turn: bitsandbytes' own CPU kernels and ours cannot both
be registered for the CPU dispatch key of one process.

Protocol: one JSON object per line on stdin, {"case": name, "calls": n}; the reply is one
line {"seconds": per-call seconds} (or {"error": ...})."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _linear(rows: int, k: int = 4096, n: int = 4096):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    layer = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu").eval()
    x = torch.randn(rows, k)

    def fn():
        with torch.no_grad():
            return layer(x)

    return fn


def _dequantize():
    import bitsandbytes.functional as F

    W = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    q, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    return lambda: F.dequantize_4bit(q, st)


def _linear_train(rows: int, k: int = 4096, n: int = 4096):
    """The QLoRA path of a frozen Linear4bit: forward and backward to x (bitsandbytes'
    MatMul4Bit: dequantize_4bit, then matmul, in both directions)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    layer = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu").train()
    x = torch.randn(rows, k, requires_grad=True)
    dy = torch.randn(rows, n)

    def fn():
        x.grad = None
        layer(x).backward(dy)

    return fn


def _quantize():
    import bitsandbytes.functional as F

    W = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    return lambda: F.quantize_4bit(W, blocksize=64, quant_type="nf4")


def _train_step():
    """PEFT QLoRA on a small random Llama loaded with BitsAndBytesConfig(load_in_4bit=True):
    one forward, backward and AdamW step on 2 x 256 tokens."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    cfg = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512)
    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(2))

    def fn():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fn


CASES = {
    "F.quantize_4bit 4096x4096 NF4": _quantize,
    "F.dequantize_4bit 4096x4096 NF4 (fp32)": _dequantize,
    "Linear4bit forward 1 row 4096->4096 (eval, no grad)": lambda: _linear(1),
    "Linear4bit forward 512 rows 4096->4096 (eval, no grad)": lambda: _linear(512),
    "Linear4bit fwd+bwd 512 rows 4096->4096 (train, frozen weight)": lambda: _linear_train(512),
    "PEFT QLoRA train step, load_in_4bit Llama 6x576, 2x256": _train_step,
}


def _warm_up(fn, calls: int = 5, seconds: float = 1.0) -> None:
    """First-call allocations, compiled fallbacks, thread pools, and the first calls' page
    faults: a fresh 64 MB dequantized weight on huge pages (defrag=madvise) stalled in
    compaction for the first ~5 calls of a process (58 ms instead of 4 ms), so one warm-up
    call timed the machine's memory, not the kernels. Both sides warm up alike."""
    t0, n = time.perf_counter(), 0
    while n < calls or (time.perf_counter() - t0 < seconds and n < 50):
        fn()
        n += 1


def main() -> int:
    # Replies go to the original stdout; anything else printed (libraries, native code) goes
    # to stderr instead, so it cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    import bnb_isa

    if bnb_isa.requested():  # the AVX2 pairing: before bitsandbytes is imported
        print(bnb_isa.hold_to_avx2(), file=sys.stderr)
    from qlora_kernels.bench import timed  # after the hold: it must precede bitsandbytes' import

    built = {}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            name = req["case"]
            if name not in built:
                built[name] = CASES[name]()
                _warm_up(built[name])
            # the harness's timing: the other worker's round ran just before this one
            reply = {"seconds": timed(built[name], int(req.get("calls", 1)))}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the benchmark
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), file=replies, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
