"""Our ONNX Runtime custom operator library (csrc/ort, built as ``qlora_kernels._ort_ops``):
the fused 4-bit linear as ONNX Runtime CPU kernels, ``qlora_kernels.MatMul4bit`` (fp32
compute: the bits of ``qlora_kernels::linear_4bit``) and ``qlora_kernels.MatMul4bitInt8``
(int8 activations: the bits of ``linear_4bit(..., compute="int8")``, the counterpart of
ONNX Runtime's MatMulNBits accuracy_level 4), and ``qlora_kernels.LinearDense`` (a dense
fp32 ``A @ W^T``: a tied output head on our dense kernel).

The two 4-bit operators read exactly the inputs of com.microsoft.MatMulBnb4 (our packed
bytes and fp32 absmax, attributes K, N, block_size) plus the 16-entry codebook as a fourth
input (fp32, or the int8 one), written from ``formats`` so that no copy of a codebook lives
in C++. ONNX Runtime's own MatMulBnb4 dequantizes its whole weight on every call; these
decode panels inside the kernel, as our torch path does.

The library is optional: it needs ONNX Runtime's C API headers at build time
(scripts/ort_headers.sh). Without it, exports keep ONNX Runtime's MatMulBnb4."""
from __future__ import annotations

import functools
import importlib.machinery
import os

from .contrib import BNB4_QUANT_TYPE, MSFT
from .errors import ExportError

DOMAIN = "qlora_kernels"
OP = "MatMul4bit"
OP_INT8 = "MatMul4bitInt8"
OP_DENSE = "LinearDense"
# The file name the library gets inside an exported folder.
FOLDER_FILE = "qlora_kernels_ort_ops.so"


def library_path() -> str | None:
    """The built library, or None if this build has none."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_ort_ops" + suffix)
        if os.path.isfile(path):
            return path
    return None


def require() -> str:
    path = library_path()
    if path is None:
        raise ExportError("custom_ops=True: this build of qlora-kernels has no ONNX Runtime custom operator "
                          "library (it needs ONNX Runtime's C API headers when it is built: run "
                          "scripts/ort_headers.sh, then reinstall)")
    return path


def resolve(custom_ops, weight_format: str) -> bool:
    """The ``custom_ops`` argument of an export: True (required), False, or None (use the
    library when the 4-bit bytes are kept and the library was built)."""
    if custom_ops is not None and not isinstance(custom_ops, bool):
        raise ExportError(f"custom_ops must be True, False or None, got {custom_ops!r}")
    if custom_ops and weight_format != "bnb4":
        raise ExportError(f"custom_ops=True applies to weight_format='bnb4', got {weight_format!r}")
    if custom_ops is None:
        return weight_format == "bnb4" and library_path() is not None
    if custom_ops:
        require()
    return custom_ops


def _dense_gemm(node, inits: dict) -> bool:
    """A ``Gemm(A, W, transB=1)``, no C, alpha = beta = 1, W an fp32 matrix initializer:
    what the GenAI graph writes for a dense head tied to the embedding (genai/linears.py)."""
    from onnx import TensorProto, helper

    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.pop("transB", 0) != 1 or attrs.pop("transA", 0) != 0 or any(v != 1.0 for v in attrs.values()):
        return False
    w = inits.get(node.input[1])
    return w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2


def use_library(proto, int8: bool = False) -> int:
    """Rewrites every com.microsoft.MatMulBnb4 node of ``proto`` (in place) as our
    MatMul4bit (``int8``: MatMul4bitInt8) on the same initializers, with one codebook
    initializer per quant type, and every dense ``Gemm(A, W, transB=1)`` on an fp32
    initializer (a tied output head) as our LinearDense, whose kernel streams W once at
    one row (ONNX Runtime's Gemm took 4.3 ms of a 10 ms SmolLM2 decode step). Returns the
    number of nodes rewritten."""
    from onnx import helper, numpy_helper

    from ...formats import codebook_cpu, int8_codebook_cpu

    op, codebook, tag = (OP_INT8, int8_codebook_cpu, "int8.") if int8 else (OP, codebook_cpu, "")
    kinds = {v: k for k, v in BNB4_QUANT_TYPE.items()}
    inits = {init.name: init for init in proto.graph.initializer}
    names = set(inits)
    codes: dict = {}
    count = 0
    for node in proto.graph.node:
        if _dense_gemm(node, inits):
            node.op_type, node.domain = OP_DENSE, DOMAIN
            del node.attribute[:]
            if node.name.endswith("/Gemm"):
                node.name = node.name[: -len("Gemm")] + OP_DENSE
            count += 1
            continue
        if node.op_type != "MatMulBnb4" or node.domain != MSFT:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        qt = attrs.get("quant_type", 1)
        if qt not in kinds:
            raise ExportError(f"MatMulBnb4 node {node.name!r}: quant_type {qt!r} is neither FP4 (0) nor NF4 (1)")
        missing = [k for k in ("K", "N", "block_size") if k not in attrs]
        if missing:
            raise ExportError(f"MatMulBnb4 node {node.name!r}: no {', '.join(missing)} attribute")
        kind = kinds[qt]
        if kind not in codes:
            name = f"qlora_kernels.codebook.{tag}{kind}"
            if name in names:
                raise ExportError(f"the graph already has an initializer named {name!r}")
            proto.graph.initializer.append(numpy_helper.from_array(codebook(kind).numpy(), name))
            codes[kind] = name
        node.op_type, node.domain = op, DOMAIN
        node.input.append(codes[kind])
        if node.name.endswith("/MatMulBnb4"):
            node.name = node.name[: -len("MatMulBnb4")] + op
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, attrs[k]) for k in ("K", "N", "block_size"))
        count += 1
    if count and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def uses_library(proto) -> bool:
    return any(node.domain == DOMAIN for node in proto.graph.node)


@functools.lru_cache(maxsize=1)
def _lib():
    import ctypes

    lib = ctypes.CDLL(require())  # the same handle ONNX Runtime gets when it loads this path
    lib.qlora_kernels_ort_set_isa.argtypes = [ctypes.c_char_p]
    lib.qlora_kernels_ort_set_isa.restype = ctypes.c_int
    lib.qlora_kernels_ort_isa.restype = ctypes.c_char_p
    return lib


def isa() -> str:
    """The CPU path the library's kernels take (its own dispatch: QLORA_KERNELS_ISA caps it too)."""
    # "replace": the library cuts a long message at its buffer's end, maybe mid-character
    name = _lib().qlora_kernels_ort_isa().decode(errors="replace")
    if name.startswith("error: "):
        raise ValueError(name[len("error: "):])
    return name


def set_isa(name: str) -> None:
    """Switches the library's CPU path (for every session in the process), as _C.set_isa does.
    It holds for the library at ``library_path()``; a copy of the file loaded from another
    path (the one an exported GenAI folder carries) is another library with its own switch,
    which QLORA_KERNELS_ISA caps at its first use."""
    if _lib().qlora_kernels_ort_set_isa(str(name).encode()) != 0:
        raise ValueError(f"isa {name!r} is not a path this CPU runs (or QLORA_KERNELS_ISA caps it)")
