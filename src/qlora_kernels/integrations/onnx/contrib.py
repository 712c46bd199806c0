"""ONNX Runtime's com.microsoft contrib operators for 4-bit weights, in one place: their
schemas (for the exporter's translation functions), the MatMulNBits weight encoding, and
one-node models that the tests and the linear benchmarks run.

MatMulBnb4 (bitsandbytes' layout): Y = A @ dequant(B)^T; B is the [N, K] weight flattened
row-major, two codes per byte with the even element in the high nibble — exactly our
``packed`` bytes; absmax is fp32, one per ``block_size`` flat elements (double-quantized
absmax must be expanded first); quant_type 0 = FP4, 1 = NF4.

MatMulNBits (affine int4): B is [N, k_blocks, block_size / 2] uint8, codes packed low
nibble first along K; scales [N, k_blocks]; without zero_points the zero point is 8, so
w = (code - 8) * scale."""
from __future__ import annotations

import torch

MSFT = "com.microsoft"
BNB4_QUANT_TYPE = {"fp4": 0, "nf4": 1}
NBITS_BLOCK = 64


def _schema(name: str, inputs: list[tuple[str, str]], attrs: list[str]):
    from onnx.defs import OpSchema

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(name, MSFT, 1, inputs=[P(n, t) for n, t in inputs], outputs=[P("Y", "T1")],
                    type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
                    attributes=[A(a, OpSchema.AttrType.INT, "") for a in attrs])


def onnxscript_op(name: str):
    """An onnxscript Op for a contrib operator. The onnx package carries no schema for
    ORT's contrib ops and the exporter's tracer needs one to bind inputs and attributes;
    it is given here rather than registered globally, so onnx's registry stays untouched."""
    from onnxscript import values

    op_cls = getattr(values, "Op", None)
    if op_cls is None:  # onnxscript >= 0.6 keeps Op in _internal
        from onnxscript._internal.values import Op as op_cls
    schemas = {
        "MatMulBnb4": lambda: _schema("MatMulBnb4", [("A", "T1"), ("B", "T2"), ("absmax", "T1")],
                                      ["K", "N", "block_size", "quant_type"]),
        "MatMulNBits": lambda: _schema("MatMulNBits", [("A", "T1"), ("B", "T2"), ("scales", "T1")],
                                       ["K", "N", "bits", "block_size", "accuracy_level"]),
    }
    return op_cls(values.Opset(MSFT, 1), name, schemas[name]())


# ------------------------------------------------------------------ MatMulNBits encoding --

def quantize_nbits(W: torch.Tensor, block_size: int = NBITS_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 for MatMulNBits (zero point 8): scale = absmax / 7 per block of K, codes
    1..15, so the worst rounding error is absmax / 14. (ORT's own quantizer maps the largest
    magnitude to code 0 with scale = value / -8, which clips the opposite extreme by up to
    absmax / 8; NF4 blocks always hold one extreme, so that convention loses more here.)
    K is zero-padded to whole blocks. Returns (B [N, k_blocks, block_size / 2], scales [N, k_blocks])."""
    if W.dim() != 2:
        raise ValueError(f"W must be [N, K], got shape {tuple(W.shape)}")
    N, K = W.shape
    kb = -(-K // block_size)
    Wp = torch.zeros(N, kb * block_size, dtype=torch.float32)
    Wp[:, :K] = W.float()
    g = Wp.reshape(N, kb, block_size)
    scale = g.abs().amax(-1) / 7.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / safe.unsqueeze(-1)) + 8, 0, 15).to(torch.uint8)
    B = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    return B, scale.contiguous()


def dequantize_nbits(B: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    N, kb, half = B.shape
    q = torch.stack([B & 0xF, B >> 4], dim=-1).reshape(N, kb, 2 * half).float()
    W = (q - 8) * scales.reshape(N, kb, 1)
    return W.reshape(N, kb * 2 * half)[:, :K].contiguous()


# ------------------------------------------------------------------- one-node models ----

def _one_node_model(node, K: int, N: int, inits):
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "one_matmul", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MSFT, 1)])


def bnb4_model(packed: torch.Tensor, absmax: torch.Tensor, K: int, N: int, blocksize: int, quant_type: str):
    """One MatMulBnb4 node on our bytes: X[M, K] -> Y[M, N]."""
    from onnx import helper, numpy_helper

    node = helper.make_node("MatMulBnb4", ["X", "B", "absmax"], ["Y"], domain=MSFT, K=K, N=N, block_size=blocksize,
                            quant_type=BNB4_QUANT_TYPE[quant_type])
    return _one_node_model(node, K, N, [numpy_helper.from_array(packed.reshape(-1).numpy(), "B"),
                                        numpy_helper.from_array(absmax.float().reshape(-1).numpy(), "absmax")])


def nbits_model(B: torch.Tensor, scales: torch.Tensor, K: int, N: int, block_size: int = NBITS_BLOCK):
    """One MatMulNBits node (4 bits, accuracy_level 0: fp32 compute) on given weights."""
    from onnx import helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["X", "B", "scales"], ["Y"], domain=MSFT, K=K, N=N, bits=4,
                            block_size=block_size, accuracy_level=0)
    return _one_node_model(node, K, N, [numpy_helper.from_array(B.numpy(), "B"),
                                        numpy_helper.from_array(scales.numpy(), "scales")])


def ort_quantized_model(W: torch.Tensor, kind: str, accuracy_level: int = 0):
    """A one-MatMul model (X[M, K] @ W.T) weight-quantized by ORT's own quantizers:
    kind "nbits" (int4 symmetric, block 64) or "bnb4" (NF4, block 64)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    N, K = W.shape
    wt = numpy_helper.from_array(W.t().contiguous().numpy().astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "mm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], [wt])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if kind == "nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, block_size=NBITS_BLOCK, is_symmetric=True, accuracy_level=accuracy_level)
    elif kind == "bnb4":
        from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

        q = MatMulBnb4Quantizer(model, BNB4_QUANT_TYPE["nf4"], 64)
    else:
        raise ValueError(f"kind must be 'nbits' or 'bnb4', got {kind!r}")
    q.process()
    qm = q.model.model if hasattr(q.model, "model") else q.model
    ops = {n.op_type for n in qm.graph.node}
    if not ops & {"MatMulNBits", "MatMulBnb4"}:
        raise RuntimeError(f"ORT's quantizer left {ops}")
    return qm


def session(model, threads: int | None = None, spinning: bool = False, quiet: bool = False,
            custom_ops: str | None = None):
    """A CPU InferenceSession on an in-memory ModelProto or a file path, with torch's thread
    count (so side-by-side timings use the same cores). ORT's pool threads spin after each
    run unless told not to; interleaved with torch (whose OpenMP threads spin too) or with
    other sessions alive, the spinning threads take the cores from the work (docs/design.md,
    "OpenMP wait policy"), so spinning is off unless a benchmark asks. ``custom_ops``: the
    path of an operator library to register (ours: ortops.library_path())."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if custom_ops:
        opts.register_custom_ops_library(custom_ops)
    if quiet:  # errors only: a GenAI decoder's adapter inputs draw one warning each (genai/config.py)
        opts.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
