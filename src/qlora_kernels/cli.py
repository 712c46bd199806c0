"""The ``qlora-kernels`` command."""
from __future__ import annotations

import argparse
import sys


_MAX_THREADS = 4096


def _threads(text: str) -> int:
    """A thread count for --threads: N >= 1, or 0 for torch's (a negative one reached
    torch.set_num_threads / the peak probe and ended in a traceback)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    # The cap keeps a typo from reaching OpenMP (or a C int overflow) as a thread count.
    if not 0 <= n <= _MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a thread count; it takes N from 1 to {_MAX_THREADS}, or 0 for torch's")
    return n


def _info(args) -> int:
    import torch

    import qlora_kernels as qk
    from qlora_kernels import _C

    print(f"qlora-kernels {qk.__version__}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (torch.get_num_threads())")
    print(f"CPU paths compiled: {', '.join(_C.compiled_isas())}")
    print(f"CPU paths this CPU runs: {', '.join(_C.supported_isas())}")
    print(f"CPU path selected: {_C.get_isa()} (cpuid best: {_C.best_isa()}; QLORA_KERNELS_ISA overrides)")
    print(f"int8-compute kernel (compute=\"int8\", K a multiple of 128): {_C.linear4_q8_plan(4096, 4096, 64)}"
          f"; one row: {_C.linear4_q8_repacked_plan(4096, 4096, 64) or 'the same'}")
    print(f"OpenMP: {'yes' if _C.openmp() else 'no'}")
    from qlora_kernels import tuning

    tuning.ensure()  # settled as the first fused call would (status() alone only reports)
    print(f"tuning: {tuning.status().line()} (QLORA_KERNELS_TUNE=0: built-in; QLORA_KERNELS_CACHE: folder)")
    print(f"backends available: {', '.join(qk.available_backends())} (selected: {qk.get_backend()})")
    for name in ("reference", "cpu"):
        reason = qk.unavailable_reason(name)
        if reason:
            print(f"  {name}: unavailable ({reason})")
    reason = qk.unavailable_reason("opencl")
    if reason:
        print(f"  opencl: unavailable ({reason})")
    else:
        from qlora_kernels import opencl

        d = opencl.device_info()
        print(f"OpenCL device: {d['selector']} {d['platform']} / {d['device']} ({d['opencl_c_version']}), "
              f"kernel style {d['style']} ({opencl.ENV_DEVICE}, {opencl.ENV_STYLE} override)")
    from qlora_kernels.integrations.onnx import ortops

    lib = ortops.library_path()
    if lib is None:
        print("ONNX Runtime operator library: not built (scripts/ort_headers.sh fetches the headers it needs)")
    else:
        print(f"ONNX Runtime operator library: {ortops.DOMAIN}.{{{ortops.OP}, {ortops.OP_INT8}, {ortops.OP_DENSE}}}, "
              f"CPU path {ortops.isa()}, on ONNX Runtime's threads ({lib})")
    if args.peak:
        from qlora_kernels import peak

        print(peak.measure(args.threads or None).table())
    return 0


def _bench(args) -> int:
    import torch

    from qlora_kernels import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    out = args.output or "bench-report"
    try:  # before the run, not after it: a file in the way lost the whole run's report
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        print(f"bench: --output {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"machine: {bench.machine_summary()}")
    rows = bench.run(quick=args.quick)
    table = bench.format_table(rows)
    print(table)
    md, png = os.path.join(out, "bench.md"), os.path.join(out, "bench.png")
    try:
        bench.plot(rows, png)
        chart = "\n![speedups](bench.png)\n"
    except ImportError as e:
        print(f"no chart ({e}); pip install matplotlib")
        chart = ""  # bench.md must not link a chart this run did not write (an older one would be stale)
    with open(md + ".tmp", "w") as f:
        f.write(f"# qlora-kernels bench\n\nMachine: {bench.machine_summary()}\n\n"
                f"Command: qlora-kernels bench{' --quick' if args.quick else ''}\n\n{table}\n{chart}")
    os.replace(md + ".tmp", md)
    print(f"wrote {md} and {png}" if chart else f"wrote {md}")
    return 0


def _fpga_estimate(args) -> int:
    import json

    from qlora_kernels import fpga

    opts = {"blocksize": args.blocksize, "double_quant": args.double_quant, "lm_head": args.lm_head,
            "context": args.context, "efficiency": args.efficiency, "clock_mhz": args.clock_mhz,
            "lora_rank": args.lora_rank, "train_seq": args.seq, "train_batch": args.batch,
            "operators": args.operators}
    try:
        est = fpga.estimate(board=args.board, model=args.model, **opts)
    except ValueError as e:
        print(f"fpga-estimate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.as_dict(), indent=2, default=float) if args.json else est)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlora-kernels", description="LoRA/QLoRA kernels for CPUs and FPGAs")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the
    # environment says the same, so the value is accepted and not used.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="version, CPU paths, backends, threads")
    i.add_argument("--peak", action="store_true", help="also measure this machine's fp32 FMA peak per CPU path and "
                   "its L2/L3/DRAM read bandwidth (a few seconds)")
    i.add_argument("--threads", type=_threads, default=0, help="threads for --peak (default 0: torch's)")
    i.set_defaults(func=_info)
    b = sub.add_parser("bench", help="benchmark the kernels against the installed peers")
    b.add_argument("--quick", action="store_true",
                   help="2048-wide shapes, fewer rounds, no training step (seconds; see README)")
    b.add_argument("--threads", type=_threads, default=0, help="torch/OpenMP threads (default 0: torch's)")
    b.add_argument("--output", help="folder for bench.md and bench.png (default: bench-report)")
    b.set_defaults(func=_bench)
    fe = sub.add_parser("fpga-estimate", help="what an FPGA board would do with a model (decode, training, resources)")
    fe.add_argument("--board", default="u280", help="u280, u55c, v80 or agilex7m (default u280)")
    fe.add_argument("--model", default="phi-3-mini", help="phi-3-mini, or a Hugging Face config.json (or its folder)")
    fe.add_argument("--json", action="store_true", help="print the full result as JSON")
    fe.add_argument("--blocksize", type=int, default=64)
    fe.add_argument("--double-quant", action="store_true", help="8-bit absmax (double quantization)")
    fe.add_argument("--lm-head", choices=("bf16", "4bit"), default="bf16")
    fe.add_argument("--context", type=int, default=1024, help="KV positions for the with-KV decode figure")
    fe.add_argument("--efficiency", type=float, default=None, help="memory derating (default: the board's)")
    fe.add_argument("--clock-mhz", type=float, default=None, help="kernel clock (default: the board's)")
    fe.add_argument("--lora-rank", type=int, default=16)
    fe.add_argument("--operators", choices=("vitis", "rtl"), default="vitis",
                    help="fp32 operator costs: typical Vitis csynth figures (assumed), or the exact RTL operators "
                         "of hls/rtl as synthesized by Yosys for UltraScale+ (measured)")
    fe.add_argument("--seq", type=int, default=512, help="training sequence length")
    fe.add_argument("--batch", type=int, default=1, help="training batch size")
    fe.set_defaults(func=_fpga_estimate)
    from .finetune.command import add_parser as _add_finetune  # light: torch loads only when it runs

    _add_finetune(sub)
    from .integrations.onnx.command import add_parser as _add_export

    _add_export(sub)
    from .integrations.onnx.genai.generate import add_parser as _add_generate

    _add_generate(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
