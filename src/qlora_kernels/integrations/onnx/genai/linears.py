"""Each projection of the decoder as ONNX nodes: the base weight in the chosen format (the
same encoders as the traced export, ``layers.py``: MatMulBnb4 on our very bytes, re-quantized
MatMulNBits, or a dense MatMul), adapters merged into it or kept as switchable branches on
graph inputs."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .. import contrib, layers
from ..errors import ExportError
from .arch import Arch, core_model


def lora_names(path: str) -> tuple[str, str]:
    """Graph input names of a projection's switchable adapter: PEFT's saved keys without
    the ``base_model.model.`` prefix (A stored as Aᵀ [in, r], B as (s·B)ᵀ [r, out])."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def _base_nodes(b, x: str, mod: nn.Module, path: str, accuracy_level: int) -> str:
    """One node for an encoded base (layers.Bnb4Base / NBitsBase / nn.Linear)."""
    if isinstance(mod, layers.Bnb4Base):
        y = b.op("MatMulBnb4", [x, b.init(f"{path}.weight.packed", mod.weight), b.init(f"{path}.weight.absmax",
                                                                                      mod.absmax)],
                 domain=contrib.MSFT, name=f"/{path}/MatMulBnb4", K=mod.in_features, N=mod.out_features,
                 block_size=mod.blocksize, quant_type=contrib.BNB4_QUANT_TYPE[mod.quant_type])
    elif isinstance(mod, layers.NBitsBase):
        y = b.op("MatMulNBits", [x, b.init(f"{path}.weight.nbits", mod.weight), b.init(f"{path}.weight.scales",
                                                                                      mod.scales)],
                 domain=contrib.MSFT, name=f"/{path}/MatMulNBits", K=mod.in_features, N=mod.out_features, bits=4,
                 block_size=contrib.NBITS_BLOCK, accuracy_level=accuracy_level)
    elif type(mod) is nn.Linear:
        y = b.op("MatMul", [x, b.init(f"{path}.weight.T", mod.weight.detach().float().t())], name=f"/{path}/MatMul")
    else:  # layers.export_base returns only the three kinds above
        raise ExportError(f"{path}: no ONNX encoding for {type(mod).__name__}")
    if mod.bias is not None:
        y = b.op("Add", [y, b.init(f"{path}.bias", mod.bias.detach().float())], name=f"/{path}/bias/Add")
    return y


def _lora_branch(b, x: str, y: str, path: str) -> str:
    a_name, b_name = lora_names(path)
    low = b.op("MatMul", [x, a_name], name=f"/{path}/lora_A/MatMul")
    return b.op("Add", [y, b.op("MatMul", [low, b_name], name=f"/{path}/lora_B/MatMul")], name=f"/{path}/lora/Add")


def _declare_lora(b, path: str, in_features: int, out_features: int) -> None:
    """Two graph inputs of dynamic rank whose defaults are empty (rank 0): with no adapter
    loaded the branch adds zeros, and ONNX Runtime GenAI feeds loaded but inactive adapters
    the same way (it zeroes the smaller dimension of each parameter)."""
    from onnx import TensorProto as T

    a_name, b_name = lora_names(path)
    b.value(a_name, T.FLOAT, [in_features, f"{path}.lora_rank"])
    b.value(b_name, T.FLOAT, [f"{path}.lora_rank", out_features])
    b.init(a_name, np.zeros((in_features, 0), dtype=np.float32))
    b.init(b_name, np.zeros((0, out_features), dtype=np.float32))


def plan(model: nn.Module, arch: Arch, fmt: str, merge: bool, switchable: set, accuracy_level: int,
         report: layers.SwapReport) -> dict[str, Callable]:
    """path -> callable(builder, x) -> y for every projection of the decoder. ``switchable``:
    the paths that get adapter inputs. With ``merge``, the model's active adapters are merged
    into their base (DoRA included); otherwise a DoRA layer is refused (its magnitude factor
    has no switchable form in ONNX Runtime GenAI)."""
    lm = core_model(model)
    lora_types = layers._lora_layer_types()
    out = {}
    for i in range(arch.layers):
        for path in arch.projections(i).values():
            try:
                module = lm.get_submodule(path)
            except AttributeError:
                raise ExportError(f"{type(lm).__name__} has no module {path}") from None
            if isinstance(module, lora_types):
                base = module.base_layer if isinstance(module, layers.LoraLinear) else module.get_base_layer()
                known = layers._as_known_base(base)
                if known is None:
                    raise ExportError(f"{path}: the exporter does not know the LoRA base layer type "
                                      f"{type(base).__module__}.{type(base).__name__}")
                if merge:
                    enc = layers.export_lora(module, path, known, fmt, True, report)
                else:
                    if layers._adapters(module, path)[1]:
                        raise ExportError(f"{path}: a DoRA adapter can only be merged into the GenAI export "
                                          "(merge_adapters=True)")
                    enc = layers.export_base(known, fmt, report)
            else:
                known = layers._as_known_base(module)
                if known is None:
                    raise ExportError(f"{path}: the exporter does not know the layer type "
                                      f"{type(module).__module__}.{type(module).__name__}")
                enc = layers.export_base(known, fmt, report)
            out[path] = _make(enc, path, path in switchable, accuracy_level)
        if arch.family == "llama":
            p = arch.projections(i)
            qkv = [p[r] for r in ("q", "k", "v")]
            packed = None if switchable & set(qkv) else _pack([out[q].enc for q in qkv])
            if packed is not None:
                out[f"model.layers.{i}.self_attn.qkv_packed"] = _make(packed, f"model.layers.{i}.self_attn.qkv_proj",
                                                                       False, accuracy_level)
    return out


def _pack(encs: list) -> nn.Module | None:
    """q, k and v as one projection (one kernel call instead of three, and GroupQueryAttention
    splits the packed output itself), when that is exact: rows concatenated, so each
    format's per-row or per-block scales carry over unchanged (MatMulBnb4's absmax blocks
    run over the flattened weight, so each part must fill whole blocks)."""
    first = encs[0]
    if any(type(e) is not type(first) or e.in_features != first.in_features or e.bias is not None for e in encs):
        return None
    n = sum(e.out_features for e in encs)
    if isinstance(first, layers.Bnb4Base):
        if any(e.blocksize != first.blocksize or e.quant_type != first.quant_type or
               (e.in_features * e.out_features) % e.blocksize for e in encs):
            return None
        return layers.Bnb4Base(torch.cat([e.weight.detach() for e in encs]), torch.cat([e.absmax.detach() for e in encs]),
                               first.blocksize, first.quant_type, first.in_features, n, None)
    if isinstance(first, layers.NBitsBase):
        packed = layers.NBitsBase.__new__(layers.NBitsBase)
        nn.Module.__init__(packed)
        packed.in_features, packed.out_features, packed.bias = first.in_features, n, None
        packed.weight = nn.Parameter(torch.cat([e.weight.detach() for e in encs]), requires_grad=False)
        packed.scales = nn.Parameter(torch.cat([e.scales.detach() for e in encs]), requires_grad=False)
        return packed
    if type(first) is nn.Linear:
        lin = nn.Linear(first.in_features, n, bias=False)
        lin.weight = nn.Parameter(torch.cat([e.weight.detach().float() for e in encs]), requires_grad=False)
        return lin
    return None


def _make(enc: nn.Module, path: str, lora: bool, accuracy_level: int) -> Callable:
    def emit(b, x):
        y = _base_nodes(b, x, enc, path, accuracy_level)
        if lora:
            _declare_lora(b, path, enc.in_features, enc.out_features)
            y = _lora_branch(b, x, y, path)
        return y

    emit.enc = enc
    return emit


def head(model: nn.Module, arch: Arch, fmt: str, accuracy_level: int, quantize: bool,
         report: layers.SwapReport) -> Callable:
    """The output projection. Dense and ``quantize`` (the nbits default): re-quantized to
    MatMulNBits as ONNX Runtime GenAI's builder does for int4 — on SmolLM2 the fp32 head is
    113 MB read per generated token, more than all 210 int4 projections. Dense and tied to
    the embedding otherwise: a Gemm with transB on the embedding's own initializer, so the
    table is stored once."""
    lm = core_model(model)
    head_mod = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else lm.lm_head
    embed = lm.get_input_embeddings().weight
    known = layers._as_known_base(head_mod)
    if known is None:
        raise ExportError(f"lm_head: the exporter does not know the layer type {type(head_mod).__name__}")
    tied = type(known) is nn.Linear and known.weight.data_ptr() == embed.data_ptr() and known.bias is None

    def emit(b, x, out_name):
        if quantize and type(known) is nn.Linear:
            enc = layers.NBitsBase(known.weight.detach().float(), known.bias)
            back = enc.dequantize()
            W = known.weight.detach().float()
            report.weight_error = max(report.weight_error,
                                      float((W - back).abs().max() / W.abs().max().clamp_min(1e-30)))
            report.layers += 1
            b.op("Identity", [_base_nodes(b, x, enc, "lm_head", accuracy_level)], [out_name],
                 name="/lm_head/Identity")
            return
        if tied:
            flat = b.op("Reshape", [x, b.init("/lm_head/shape_in", np.array([-1, arch.hidden], dtype=np.int64))],
                        name="/lm_head/Reshape_in")
            y = b.op("Gemm", [flat, "model.embed_tokens.weight"], name="/lm_head/Gemm", transB=1)
            shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [x], name="/lm_head/Shape"),
                                                   b.init("/lm_head/s0", np.array([0], dtype=np.int64)),
                                                   b.init("/lm_head/s2", np.array([2], dtype=np.int64))],
                                         name="/lm_head/Slice"),
                                   b.init("/lm_head/vocab", np.array([arch.vocab], dtype=np.int64))],
                         name="/lm_head/Concat", axis=0)
            b.op("Reshape", [y, shape], [out_name], name="/lm_head/Reshape_out")
            report.dense += 1
            return
        enc = layers.export_base(known, fmt, report)
        y = _base_nodes(b, x, enc, "lm_head", accuracy_level)
        b.op("Identity", [y], [out_name], name="/lm_head/Identity")

    return emit
