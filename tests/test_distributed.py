"""2-process DDP, FSDP2 and DeepSpeed ZeRO-2/3 (gloo, CPU, loopback) QLoRA training of a
tiny random Phi-3 against one process on the same global batches: adapter gradients after
step 1 and adapter weights after 5 steps, packed bytes untouched, adapters saved from rank
0 loading into PEFT. The ranks are real processes started here (tests/dist_worker.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
# Step-1 gradients: the same sums in another order (each rank reduces half the batch, then
# gloo adds two halves): a few fp32 ulps of the largest gradient (~0.05).
GRAD_ATOL = 1e-7
# After 5 AdamW steps (lr 1e-2): ulp-level gradient differences pass through m / sqrt(v),
# which amplifies them where v is tiny; observed ~1e-6, bound 1e-5 (lr * 1e-3).
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", **extra)
    env.pop("QLORA_KERNELS_ISA", None)
    return env


def launch(mode: str, out: Path, *args: str, world: int = WORLD) -> list[subprocess.CompletedProcess]:
    """Starts `world` ranks of tests/dist_worker.py (or one process for 'single') and waits."""
    cmd = [sys.executable, "-m", "tests.dist_worker", "--mode", mode, "--out", str(out), *args]
    if mode == "single":
        return [subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)]
    return launch_ranks(cmd, world)


def launch_ranks(cmd: list[str], world: int = WORLD) -> list[subprocess.CompletedProcess]:
    """Starts `world` gloo ranks of `cmd` (RANK/WORLD_SIZE/MASTER_* set) and waits for all."""
    port = str(_free_port())
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_PORT=port))
             for r in range(world)]
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def run(mode: str, out: Path) -> dict:
    for r in launch(mode, out):
        assert r.returncode == 0, f"{mode} rank failed:\n{r.stderr[-4000:]}"
    return torch.load(out / "result.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run("single", tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "zero2", "zero3"])
def test_matches_one_process(mode, single, tmp_path):
    got = run(mode, tmp_path)
    assert got["world"] == WORLD
    ref_grads, grads = single["grads1"], got["grads1"]
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 16  # A and B of 8 targets (2 layers x 4)
    for name, g in ref_grads.items():
        # Averaging, not summing: a 2x (sum) or 0.5x (double division) error is far outside this.
        torch.testing.assert_close(grads[name], g, atol=GRAD_ATOL, rtol=0, msg=lambda m: f"{mode} grad {name}: {m}")
    assert max(g.abs().max() for g in ref_grads.values()) > 1e-2  # the gradients are not all ~0
    for name, w in single["adapters"].items():
        torch.testing.assert_close(got["adapters"][name], w, atol=WEIGHT_ATOL, rtol=0,
                                   msg=lambda m: f"{mode} weight {name}: {m}")
    moved = max((got["adapters"][n] - w).abs().max() for n, w in _initial_adapters().items())
    assert moved > 1e-2  # 5 steps really trained
    # Packed 4-bit bytes (and absmax) identical before and after, and equal to one process's.
    assert got["digest_before"] == got["digest_after"] == single["digest_before"] == single["digest_after"]
    # FSDP2 and ZeRO-3 really shard the packed bytes; DDP and ZeRO-2 replicate them.
    expected = 1 / WORLD if mode in ("fsdp2", "zero3") else 1.0
    assert got["packed_local_fraction"] == pytest.approx(expected, abs=0.01)
    _check_saved_adapter(tmp_path / "adapter", got["adapters"])


def _initial_adapters() -> dict:
    from tests.dist_worker import build_model

    model, _ = build_model(0, 2)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_saved_adapter(path: Path, adapters: dict) -> None:
    """The adapter saved from rank 0 loads into PEFT on a fresh quantized base and holds the
    trained weights exactly."""
    from transformers import AutoModelForCausalLM

    from qlora_kernels.integrations.peft import from_pretrained

    import qlora_kernels as qk
    from tests.hf_models import tiny_config

    base = qk.quantize_model(AutoModelForCausalLM.from_config(tiny_config("phi3"), dtype=torch.float32))
    loaded = from_pretrained(base, str(path))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert sorted(lora) == sorted(adapters)
    for n, p in lora.items():
        assert torch.equal(p.detach(), adapters[n]), n


def test_world_size_must_divide_the_batch(tmp_path):
    results = launch("ddp", tmp_path, "--global-batch", "5")
    assert all(r.returncode != 0 for r in results)
    assert "global batch size 5 is not divisible by the world size 2" in results[0].stderr


def test_mesh_on_another_device_type_is_refused_and_bf16_policy_leaves_bytes(tmp_path):
    """One gloo rank: a mesh on 'meta' is refused; under MixedPrecisionPolicy(bf16) the packed
    weight reaches the layer's forward as the same uint8 bytes (only floats are cast)."""
    script = (
        "import hashlib, torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import MixedPrecisionPolicy\n"
        "from qlora_kernels.nn import Linear4bit, LoraLinear\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "from qlora_kernels.integrations import distributed as qd\n"
        "qd.init_process_group()\n"
        "for dt in ('meta', 'cuda'):\n"
        "    try:\n"
        "        qd.fully_shard_model(torch.nn.Linear(4, 4), mesh=init_device_mesh(dt, (1,)))\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
        "    except Exception as e:\n"
        "        print('mesh could not be built:', type(e).__name__, e)\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(LoraLinear(Linear4bit.from_linear(torch.nn.Linear(64, 64, bias=False))))\n"
        "h = lambda t: hashlib.sha256(t.clone().numpy().tobytes()).hexdigest()  # clone: numpy() pins storage\n"
        "before = h(m[0].base_layer.weight.detach())\n"
        "seen = []\n"
        "m[0].register_forward_pre_hook(lambda mod, a: seen.append((mod.base_layer.weight.dtype, h(mod.base_layer.weight.detach()))))\n"
        "qd.fully_shard_model(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))\n"
        "y = m(torch.randn(3, 64))\n"
        "print('forward saw', seen[0][0], seen[0][1] == before, 'out', y.dtype)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=_env(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(_free_port())))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: the device mesh is on 'meta'" in r.stdout
    assert "forward saw torch.uint8 True out torch.bfloat16" in r.stdout, r.stdout


def test_helpers_refuse_bad_input():
    from qlora_kernels.integrations import distributed as qd

    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        qd.per_rank_batch_size(8, 3)
    with pytest.raises(ValueError, match="disagree"):
        qd.shard_batch({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)}, 0, 2)
    assert torch.equal(qd.shard_batch({"a": torch.arange(6)}, 1, 3)["a"], torch.tensor([2, 3]))
    for rank in (-1, 2, 5):  # were empty slices: a NaN or zero loss later
        with pytest.raises(ValueError, match=f"rank must be in \\[0, 2\\).*got {rank}"):
            qd.shard_batch({"a": torch.arange(4)}, rank, 2)
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        qd.deepspeed_config(1, 2, world_size=2)
    with pytest.raises(RuntimeError, match="no process group"):
        qd.wrap_ddp(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="only 'gloo'"):
        qd.init_process_group("nccl")
    cfg = qd.deepspeed_config(3, 2, gradient_accumulation_steps=2, world_size=4)
    assert cfg["train_batch_size"] == 16 and cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0


# Each rank builds the same tiny models, keeps an unwrapped copy as the one-process reference
# (full batch), wraps the model with fully_shard_model, runs its half of the batch and checks
# outputs and (all-gathered) gradients against the reference.
_NESTED_UNITS_SCRIPT = """
import copy, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
import qlora_kernels as qk
from qlora_kernels.nn import Linear4bit, LoraLinear
from qlora_kernels.integrations import distributed as qd

rank, world = qd.init_process_group()
torch.set_num_threads(1)

class Block(nn.Module):  # holds a 4-bit layer and a child that holds one (the adapter's base)
    def __init__(self):
        super().__init__()
        self.up = LoraLinear(Linear4bit.from_linear(nn.Linear(64, 128)), r=4)
        self.down = Linear4bit.from_linear(nn.Linear(128, 64))
        nn.init.normal_(self.up.lora_B)  # LoRA starts B at 0; a non-zero B gives A a gradient
    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))

class Net(nn.Module):  # the root holds a 4-bit layer directly
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = Linear4bit.from_linear(nn.Linear(64, 10))
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x)

def grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            out[n] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    return out

def check(name, model, inputs, forward, pre=None):
    ref = copy.deepcopy(model)
    ref_out = forward(ref, inputs)
    ref_out.mean().backward()
    per = inputs[0].shape[0] // world
    if pre is not None:
        pre(model)
    units = [type(u).__name__ for u in qd.decoder_layers(model)]
    qd.fully_shard_model(model)
    out = forward(model, [t[rank * per:(rank + 1) * per] for t in inputs])
    out.mean().backward()  # FSDP2 averages the ranks' gradients: the mean over the whole batch
    torch.testing.assert_close(out, ref_out[rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
    want, got = grads(ref), grads(model)
    assert sorted(got) == sorted(want) and want, (sorted(got), sorted(want))
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {n}: {m}")
    if rank == 0:
        print("OK", name, units, flush=True)

# transformers' MBart names nested classes in _no_split_modules (MBartAttention inside
# MBart*Layer), with PEFT adapters inside the attention.
from transformers import MBartConfig, MBartForConditionalGeneration
from peft import LoraConfig
from qlora_kernels.integrations.peft import get_peft_model
cfg = MBartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
torch.manual_seed(0)
mbart = get_peft_model(qk.quantize_model(MBartForConditionalGeneration(cfg)),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
ids = torch.randint(4, 64, (4, 6), generator=torch.Generator().manual_seed(1))
check("mbart", mbart, [ids, ids.flip(1)], lambda m, t: m(input_ids=t[0], decoder_input_ids=t[1]).logits)

x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
torch.manual_seed(0)
check("nested", Net(), [x], lambda m, t: m(t[0]))
torch.manual_seed(0)
# a block the caller sharded first keeps its unit, and nothing inside it is sharded again
check("presharded", Net(), [x], lambda m, t: m(t[0]), pre=lambda m: fully_shard(m.blocks[0]))
torch.manual_seed(0)
seq = qk.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)))
check("sequential", seq, [x], lambda m, t: m(t[0]))
try:
    qd.fully_shard_model(seq)
except ValueError as e:
    print("again:", e, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_fully_shard_model_wraps_bottom_up_and_matches_one_process():
    """fully_shard_model applied fully_shard top-down: nested _no_split_modules classes (MBart)
    crashed in FSDP2, and a root holding a 4-bit layer directly was sharded twice."""
    results = launch_ranks([sys.executable, "-c", _NESTED_UNITS_SCRIPT])
    for r in results:
        assert r.returncode == 0, r.stderr[-4000:]
    out = results[0].stdout
    assert "OK mbart ['MBartAttention', 'MBartEncoderLayer', 'MBartAttention', 'MBartAttention', " \
           "'MBartDecoderLayer']" in out, out
    assert "OK nested ['LoraLinear', 'Block', 'LoraLinear', 'Block']" in out, out
    assert "OK presharded" in out and "OK sequential []" in out, out
    assert "again: fully_shard_model: the root FSDPSequential already has FSDP2 state" in out, out
