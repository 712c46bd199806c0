"""qlora_kernels.integrations.onnx.export on tiny random Phi-3 and Llama models, quantized
with our layers, with and without LoRA/DoRA adapters, in each weight format: ONNX Runtime's
logits against torch's at shapes other than the traced one, the graph's operators, adapter
tensors that can be swapped by name, merging, and bad input."""
import os

import onnx
import pytest
import torch
from onnx import numpy_helper

import qlora_kernels as qk
from qlora_kernels.integrations.onnx import ExportError, export, swap_adapters, verify

from .hf_models import TARGETS, tiny_model
from .onnx_helpers import REL_TOL, ort_logits, torch_logits, with_lora

SHAPES = [(2, 8), (1, 1), (3, 13)]  # traced at (2, 8): the others prove the dims are dynamic


def _model(arch, adapters=None):
    m = qk.quantize_model(tiny_model(arch))
    if adapters == "lora":
        return with_lora(m, TARGETS[arch][:2])
    if adapters == "dora":
        return with_lora(m, TARGETS[arch][-2:], dora=True)
    return m


def _ops(path):
    counts = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


# Every pair of factors (architecture x format, format x adapters, architecture x adapters)
# appears at least once: 6 exports instead of the 12 of the full product, for CI time
# (an export of the tiny model takes 10-20 s on 2 cores).
PAIRWISE = [("llama", "bnb4", "lora"), ("llama", "nbits", None), ("llama", "fp32", "lora"),
            ("phi3", "bnb4", None), ("phi3", "nbits", "lora"), ("phi3", "fp32", None)]


@pytest.mark.parametrize("arch,fmt,adapters", PAIRWISE)
def test_logits_match_torch(tmp_path, arch, fmt, adapters):
    model = _model(arch, adapters)
    path = tmp_path / "m.onnx"
    res = export(model, path, weight_format=fmt, log=None)
    n_base = len(TARGETS[arch]) * 2  # two decoder layers
    ops = _ops(path)
    assert ops.get({"bnb4": "MatMulBnb4", "nbits": "MatMulNBits"}.get(fmt, "x"), 0) == (0 if fmt == "fp32" else n_base)
    assert res.layers == n_base and res.adapters == (4 if adapters else 0)
    assert res.ort_error is not None
    g = torch.Generator().manual_seed(3)
    for b, t in SHAPES:
        ids = torch.randint(1, 128, (b, t), generator=g)
        err = verify.errors(torch_logits(model, ids), ort_logits(path, ids))
        if fmt == "nbits":
            assert res.weight_error > 0
            # The reported error is measured on the example inputs; at other shapes the same
            # weights give an error of the same size, so it is allowed twice over.
            assert err["max_rel"] <= 2 * res.requant_error["max_rel"] + REL_TOL, (b, t, err, res.requant_error)
        else:
            assert res.weight_error == 0
            assert err["max_rel"] <= REL_TOL, (b, t, err)
    if fmt == "nbits":  # and ORT equals the torch model that was exported, to fp32 rounding
        ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        assert abs(res.ort_error["max_abs"] - res.requant_error["max_abs"]) <= 1e-4


def test_padding_mask_and_dora(tmp_path):
    model = _model("llama", "dora")
    path = tmp_path / "d.onnx"
    res = export(model, path, log=None)
    assert res.adapters == 4
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert any(n.endswith("down_proj.lora_magnitude_vector.default.weight") for n in names)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    err = verify.errors(torch_logits(model, ids, mask)[mask.bool()], ort_logits(path, ids, mask)[mask.bool()])
    assert err["max_rel"] <= REL_TOL
    # the export's own check on padded example inputs: the padded queries' logits (torch and
    # ONNX Runtime fill them differently, meaninglessly) were counted, and a correct file was
    # reported 1.1-1.5 off relative
    res = export(model, tmp_path / "p.onnx", example_inputs=(ids, mask), log=None)
    assert res.ort_error["max_rel"] <= REL_TOL and res.requant_error["max_rel"] <= REL_TOL, res
    # the stored factor belongs to the exported A and B: swapping them alone was accepted and
    # gave outputs 85% off
    from peft import get_peft_model_state_dict

    with pytest.raises(ExportError, match="adapters are DoRA"):
        swap_adapters(path, tmp_path / "swapped.onnx", get_peft_model_state_dict(model))
    assert not (tmp_path / "swapped.onnx").exists()


def test_bnb4_block_sizes_onnx_runtime_cannot_run_are_refused(tmp_path):
    """MatMulBnb4 runs block sizes 16-256: a 512 one was written, and ONNX Runtime refused the
    file at load (with verify off, silently)."""
    model = qk.quantize_model(tiny_model("llama"), blocksize=512)
    with pytest.raises(ExportError, match="this layer has 512"):
        export(model, tmp_path / "m.onnx", verify_output=False, log=None)
    assert not os.listdir(tmp_path)
    res = export(model, tmp_path / "n.onnx", weight_format="nbits", log=None)  # ONNX Runtime loads and runs it
    assert (tmp_path / "n.onnx").exists() and res.ort_error is not None


def test_adapters_are_named_and_swappable(tmp_path):
    """The branches' A and B are initializers carrying the PEFT names (stored transposed);
    swap_adapters replacing every B by zeros gives the base model's logits, and putting
    the adapter back gives the adapted ones."""
    model = _model("phi3", "lora")
    path = tmp_path / "a.onnx"
    export(model, path, log=None)
    sd = model.state_dict()
    lora = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer
            if ".lora_" in i.name}
    assert len(lora) == 8
    for name, t in lora.items():
        assert torch.equal(t.t(), sd[name]), name
    zero = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in sd.items()}
    assert swap_adapters(path, tmp_path / "zero.onnx", zero) == 8
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with model.disable_adapter():
        base = torch_logits(model, ids)
    assert verify.errors(base, ort_logits(tmp_path / "zero.onnx", ids))["max_rel"] <= REL_TOL
    adapted = torch_logits(model, ids)
    assert verify.errors(base, adapted)["max_rel"] > 10 * REL_TOL  # the adapter matters
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(model)  # the keys of adapter_model.safetensors
    swap_adapters(tmp_path / "zero.onnx", tmp_path / "back.onnx", saved)
    assert verify.errors(adapted, ort_logits(tmp_path / "back.onnx", ids))["max_rel"] <= REL_TOL
    with pytest.raises(ExportError, match="expected shape"):
        swap_adapters(path, tmp_path / "bad.onnx", {k: v[:1] for k, v in saved.items()})
    with pytest.raises(ExportError, match="no tensor given"):
        swap_adapters(path, tmp_path / "bad.onnx", {})
    assert not (tmp_path / "bad.onnx").exists()

    # two active adapters: a saved file's keys (no adapter name) filled both branches with one
    # adapter, silently (base + 2 x that adapter)
    from peft import LoraConfig

    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["phi3"][:2], init_lora_weights=False))
    model.base_model.set_adapter(["default", "b"])
    export(model, tmp_path / "two.onnx", log=None)
    with pytest.raises(ExportError, match="has no adapter name.*2 adapters' branches"):
        swap_adapters(tmp_path / "two.onnx", tmp_path / "bad.onnx", get_peft_model_state_dict(model, adapter_name="b"))
    assert swap_adapters(tmp_path / "two.onnx", tmp_path / "ok.onnx", model.state_dict()) == 16


@pytest.mark.parametrize("fmt,dora", [("fp32", True), ("bnb4", False)])
def test_merge_adapters(tmp_path, fmt, dora):
    model = _model("phi3", "dora" if dora else "lora")
    path = tmp_path / "merged.onnx"
    res = export(model, path, weight_format=fmt, merge_adapters=True, log=None)
    assert res.merged == 4 and res.adapters == 0
    assert not any(".lora_" in i.name for i in onnx.load(str(path)).graph.initializer)
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    err = verify.errors(torch_logits(model, ids), ort_logits(path, ids))
    if fmt == "fp32":  # merging into dense weights is exact up to fp32 rounding
        assert res.weight_error == 0 and err["max_rel"] <= REL_TOL
    else:  # into NF4 means re-quantizing: the error is reported, and it is what ORT shows
        assert res.weight_error > 0
        assert err["max_rel"] <= 2 * res.requant_error["max_rel"] + REL_TOL


def test_plain_model_stays_dense(tmp_path):
    model = tiny_model("llama")
    res = export(model, tmp_path / "p.onnx", weight_format="bnb4", log=None)
    assert res.layers == 0 and res.dense == 15  # 14 projections and lm_head: no precision changed silently
    assert "MatMulBnb4" not in _ops(tmp_path / "p.onnx")
    assert res.ort_error["max_rel"] <= REL_TOL


# ---------------------------------------------------------------------- bad input ----

class Int8Linear(torch.nn.Module):
    """A quantized layer the exporter has never heard of."""

    def __init__(self, k, n):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
        self.n = n

    def forward(self, x):
        return x @ self.qweight.float().t()


def test_unknown_layer_is_named(tmp_path):
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj = Int8Linear(64, 128)
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.up_proj .*Int8Linear"):
        export(model, tmp_path / "u.onnx", log=None)
    assert os.listdir(tmp_path) == []


def test_unknown_peft_layer_is_named(tmp_path):
    from peft import LoraConfig

    from qlora_kernels.integrations.peft import get_peft_model

    model = get_peft_model(qk.quantize_model(tiny_model("llama")), LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ExportError, match=r"embed_tokens .*PEFT adapter layer"):
        export(model, tmp_path / "e.onnx", log=None)
    assert os.listdir(tmp_path) == []


def test_existing_file_and_unwritable_folder(tmp_path):
    model = tiny_model("llama")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export(model, target, log=None)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(ExportError, match="does not exist"):
        export(model, tmp_path / "no" / "m.onnx", log=None)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores modes: make the folder a file's child instead
            bad = target / "m.onnx"
            with pytest.raises(ExportError, match="does not exist"):
                export(model, bad, log=None)
        else:
            with pytest.raises(ExportError, match="not writable"):
                export(model, ro / "m.onnx", log=None)
    finally:
        ro.chmod(0o700)
    with pytest.raises(ExportError, match="is a folder"):
        export(model, tmp_path, log=None)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from torch.onnx import ONNXProgram

    def broken_save(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ONNXProgram, "save", broken_save)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        export(tiny_model("llama"), target, overwrite=True, log=None)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"] and target.read_bytes() == b"old"


@pytest.mark.parametrize("kw,msg", [(dict(weight_format="int8"), "weight_format must be one of"),
                                    (dict(opset=7), "opset must be an int from 18"),
                                    (dict(example_inputs=torch.zeros(2, 3)), "integer tensor"),
                                    (dict(example_inputs="hello"), "example_inputs must be"),
                                    (dict(example_inputs=(torch.ones(1, 4, dtype=torch.long),) * 3),
                                     "a tuple .* of 3 items"),
                                    (dict(example_inputs=(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5))),
                                     "attention_mask'\\] must be a tensor shaped like input_ids")])
def test_bad_arguments(tmp_path, kw, msg):
    with pytest.raises(ExportError, match=msg):
        export(tiny_model("llama"), tmp_path / "m.onnx", log=None, **kw)
    assert os.listdir(tmp_path) == []


def test_example_inputs_as_torch_onnx_export_takes_them():
    """A tensor, a tuple (input_ids[, attention_mask]) as torch.onnx.export's args, a dict,
    or a transformers BatchEncoding: the same example."""
    from transformers import BatchEncoding

    from qlora_kernels.integrations.onnx.exporter import _example

    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1]])
    ones = torch.ones_like(ids)
    for given, want_mask in [(ids, ones), ((ids,), ones), ([ids, mask], mask), ({"input_ids": ids}, ones),
                             (BatchEncoding({"input_ids": ids, "attention_mask": mask}), mask)]:
        got_ids, got_mask = _example(model, given)
        assert torch.equal(got_ids, ids) and torch.equal(got_mask, want_mask), type(given)
