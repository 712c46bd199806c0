"""What the libraries see of this CPU, checked before a CPU-class lane runs (scripts/emulated_cpu.sh,
scripts/masked_cpu.sh): a lane proves nothing unless every library picks its kernels for the CPU
the lane stands for by its own cpuid query. Seen: our path (qlora_kernels._C.best_isa), torch's
ATen capability, bitsandbytes' AVX-512 answer; with --mask, also that ONNX Runtime (whose MLAS
has no switch) asked cpuid and was answered by scripts/cpuid_mask.c.
    python scripts/cpu_view.py <lane> <our path> <torch capability> [--mask]
Exits 1, naming what was seen, when any library sees another CPU."""
import argparse
import ctypes
import os
import sys


def _ort_cpuid_queries_masked() -> int:
    """cpuid queries the mask answered while ONNX Runtime loaded and ran a MatMul."""
    import numpy as np
    from onnx import TensorProto, helper

    so = next(p for p in os.environ.get("LD_PRELOAD", "").split(":") if p.endswith("cpuid_mask.so"))
    mask = ctypes.CDLL(so)
    mask.qk_cpuid_mask_count.restype = ctypes.c_long
    before = mask.qk_cpuid_mask_count()
    import onnxruntime as ort  # its cpuid queries are counted from here

    t = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "abc"]
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g", t[:2], t[2:]),
                              opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((4, 4), np.float32)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": x, "b": x})
    return mask.qk_cpuid_mask_count() - before


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("lane")
    ap.add_argument("ours", help="the path cpuid must pick for our extension")
    ap.add_argument("torch_cap", help="torch.backends.cpu.get_cpu_capability() expected")
    ap.add_argument("--mask", action="store_true", help="also require ONNX Runtime's cpuid to go through the mask")
    a = ap.parse_args()
    os.environ["QLORA_KERNELS_BNB"] = "0"  # bitsandbytes' own view, without our plugin loaded
    import torch
    from bitsandbytes.cextension import lib

    from qlora_kernels import _C

    seen = (_C.best_isa(), torch.backends.cpu.get_cpu_capability(), bool(lib.has_avx512f_cpu()))
    line = f"{a.lane}: cpuid picks our {seen[0]} path, torch {seen[1]}, bitsandbytes AVX-512 {seen[2]}"
    ok = seen == (a.ours, a.torch_cap, False)
    if a.mask:
        asked = _ort_cpuid_queries_masked()
        line += f", ONNX Runtime's cpuid answered by the mask {asked}x"
        ok = ok and asked > 0
    print(line)
    if not ok:
        print(f"{a.lane}: expected our {a.ours} path, torch {a.torch_cap}, bitsandbytes without AVX-512"
              f"{' and ONNX Runtime asking the mask' if a.mask else ''}: a library does not see the lane's CPU; "
              "not running", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
