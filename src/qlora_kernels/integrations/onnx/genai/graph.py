"""The KV-cache decoder as an ONNX graph, written node by node (as ONNX Runtime GenAI's own
model builder does) rather than traced: the graph is small and regular, and writing it
directly puts ONNX Runtime's fused CPU operators where they belong.

Inputs and outputs follow ONNX Runtime GenAI's decoder convention: ``input_ids`` [batch,
sequence] int64, ``attention_mask`` [batch, total_sequence] int64, ``past_key_values.{i}.key``
/ ``.value`` [batch, kv_heads, past_sequence, head_size] fp32 in; ``logits`` [batch,
sequence, vocab] and ``present.{i}.key`` / ``.value`` out. Per layer:

    h   = SimplifiedLayerNormalization(x)              (RMSNorm; layer 0)
          SkipSimplifiedLayerNormalization(x, residual) (the residual add and RMSNorm, later)
    q,k,v = projections of h                            (Phi-3: one packed qkv projection)
    a   = GroupQueryAttention(q, k, v, past, rotary tables; do_rotary=1)
    x   = o_proj(a);  h = SkipSimplifiedLayerNormalization(x, residual)
    m   = down_proj(silu(gate_proj(h)) * up_proj(h))

Every projection is a 4-bit or dense linear (linears.py), plus, where adapters are kept
switchable, ``MatMul(MatMul(h, lora_A), lora_B)`` on two graph inputs of dynamic rank whose
defaults are empty (rank 0), the convention ONNX Runtime GenAI feeds inactive adapters with.
GroupQueryAttention derives each token's position from ``attention_mask`` (seqlens_k =
tokens so far - 1), so there is no ``position_ids`` input."""
from __future__ import annotations

import numpy as np
import torch

from .. import contrib
from .arch import Arch

OPSET = 17  # ONNX Runtime's contrib operators (GroupQueryAttention, MatMulNBits, ...) run beside it


class Builder:
    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._n = 0

    def init(self, name: str, array) -> str:
        from onnx import numpy_helper

        if isinstance(array, torch.Tensor):
            array = array.detach().contiguous().numpy()
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list, outputs: int | list = 1, domain: str = "", name: str | None = None,
           **attrs):
        from onnx import helper

        self._n += 1
        base = name or f"/{op_type}_{self._n}"
        outs = outputs if isinstance(outputs, list) else [f"{base}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def value(self, name: str, elem, shape: list, output: bool = False):
        from onnx import helper

        (self.outputs if output else self.inputs).append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, producer: str, meta: dict):
        from onnx import helper

        graph = helper.make_graph(self.nodes, "decoder", self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, producer_name=producer,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(contrib.MSFT, 1)])
        m.ir_version = 8  # graph inputs that have initializers as defaults (the adapters) need IR >= 4
        helper.set_model_props(m, {k: str(v) for k, v in meta.items()})
        return m


def _skip_norm(b: Builder, x: str, residual: str, weight: str, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm(x + residual) and the sum (the next residual), in one fused node."""
    out, total = f"{name}/output_0", f"{name}/output_3"
    b.op("SkipSimplifiedLayerNormalization", [x, residual, weight], [out, "", "", total], domain=contrib.MSFT,
         name=name, epsilon=eps)
    return out, total


def build(arch: Arch, linears, tables: tuple[torch.Tensor, torch.Tensor], embed: torch.Tensor, norms: dict,
          head) -> Builder:
    """``linears``: path -> callable(builder, x) -> y (linears.py); ``norms``: name -> weight;
    ``head``: callable(builder, x) -> logits."""
    from onnx import TensorProto as T

    b = Builder()
    b.value("input_ids", T.INT64, ["batch_size", "sequence_length"])
    b.value("attention_mask", T.INT64, ["batch_size", "total_sequence_length"])
    for i in range(arch.layers):
        for kv in ("key", "value"):
            b.value(f"past_key_values.{i}.{kv}", T.FLOAT,
                    ["batch_size", arch.kv_heads, "past_sequence_length", arch.head_size])
    b.value("logits", T.FLOAT, ["batch_size", "sequence_length", arch.vocab], output=True)
    for i in range(arch.layers):
        for kv in ("key", "value"):
            b.value(f"present.{i}.{kv}", T.FLOAT,
                    ["batch_size", arch.kv_heads, "total_sequence_length", arch.head_size], output=True)

    # what GroupQueryAttention needs from the mask: per sequence the index of its last token,
    # and the total length (past + new), both int32
    one = b.init("/const/one_i64", np.array([1], dtype=np.int64))
    seqlens = b.op("Cast", [b.op("Sub", [b.op("ReduceSum", ["attention_mask", one], keepdims=0), one])],
                   to=T.INT32, name="/attn_mask/seqlens_k")
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", ["attention_mask"]),
                                          b.init("/const/one_scalar", np.array(1, dtype=np.int64))], axis=0)],
                 to=T.INT32, name="/attn_mask/total_seq_len")
    cos = b.init("cos_cache", tables[0])
    sin = b.init("sin_cache", tables[1])

    x = b.op("Gather", [b.init("model.embed_tokens.weight", embed), "input_ids"], axis=0, name="/embed_tokens")
    residual = None
    for i in range(arch.layers):
        p = arch.projections(i)
        pre = f"/model/layers.{i}"
        ln1 = b.init(f"model.layers.{i}.input_layernorm.weight", norms[f"layers.{i}.input_layernorm"])
        if residual is None:
            h, residual = b.op("SimplifiedLayerNormalization", [x, ln1], name=f"{pre}/input_layernorm",
                               axis=-1, epsilon=arch.eps, stash_type=1), x
        else:
            h, residual = _skip_norm(b, x, residual, ln1, f"{pre}/input_layernorm", arch.eps)
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        packed = linears.get(f"model.layers.{i}.self_attn.qkv_packed") if arch.family == "llama" else \
            linears[p["qkv"]]
        if packed is not None:  # one packed projection: GroupQueryAttention splits it itself
            qkv = [packed(b, h), "", ""]
        else:
            qkv = [linears[p[r]](b, h) for r in ("q", "k", "v")]
        attn = b.op("GroupQueryAttention", qkv + past + [seqlens, total, cos, sin], [f"{pre}/attn/output_0"] + present,
                    domain=contrib.MSFT, name=f"{pre}/attn/GroupQueryAttention", num_heads=arch.heads,
                    kv_num_heads=arch.kv_heads, do_rotary=1, rotary_interleaved=0,
                    local_window_size=arch.sliding_window,
                    scale=float(arch.head_size) ** -0.5)[0]
        x = linears[p["o"]](b, attn)
        ln2 = b.init(f"model.layers.{i}.post_attention_layernorm.weight", norms[f"layers.{i}.post_attention_layernorm"])
        h, residual = _skip_norm(b, x, residual, ln2, f"{pre}/post_attention_layernorm", arch.eps)
        if arch.family == "phi3":
            gate, up = b.op("Split", [linears[p["gate_up"]](b, h),
                                      b.init(f"{pre}/mlp/split", np.array([arch.intermediate] * 2, dtype=np.int64))],
                            2, axis=-1, name=f"{pre}/mlp/Split")
        else:
            gate, up = linears[p["gate"]](b, h), linears[p["up"]](b, h)
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{pre}/mlp/act/Sigmoid")], name=f"{pre}/mlp/act/Mul")
        x = linears[p["down"]](b, b.op("Mul", [act, up], name=f"{pre}/mlp/Mul"))
    h, _ = _skip_norm(b, x, residual, b.init("model.norm.weight", norms["norm"]), "/model/norm", arch.eps)
    head(b, h, "logits")
    return b
