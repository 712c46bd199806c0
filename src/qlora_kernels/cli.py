"""The ``qlora-kernels`` command."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    import qlora_kernels as qk
    from qlora_kernels import _C

    print(f"qlora-kernels {qk.__version__}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (torch.get_num_threads())")
    print(f"CPU paths compiled: {', '.join(_C.compiled_isas())}")
    print(f"CPU paths this CPU runs: {', '.join(_C.supported_isas())}")
    print(f"CPU path selected: {_C.get_isa()} (cpuid best: {_C.best_isa()}; QLORA_KERNELS_ISA overrides)")
    print(f"OpenMP: {'yes' if _C.openmp() else 'no'}")
    print(f"backends available: {', '.join(qk.available_backends())} (selected: {qk.get_backend()})")
    for name in ("reference", "cpu"):
        reason = qk.unavailable_reason(name)
        if reason:
            print(f"  {name}: unavailable ({reason})")
    return 0


def _bench(args) -> int:
    import torch

    from qlora_kernels import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {bench.machine_summary()}")
    rows = bench.run(quick=args.quick)
    table = bench.format_table(rows)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(f"# qlora-kernels bench\n\nMachine: {bench.machine_summary()}\n\n{table}\n")
        print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlora-kernels", description="LoRA/QLoRA kernels for CPUs and FPGAs")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, CPU paths, backends, threads").set_defaults(func=_info)
    b = sub.add_parser("bench", help="benchmark the kernels against the installed peers")
    b.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds (about a minute)")
    b.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    b.add_argument("--output", help="also write the table as markdown to this file")
    b.set_defaults(func=_bench)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
