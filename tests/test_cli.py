"""The `qlora-kernels` command's info and bench subcommands (finetune and fpga-estimate
have their own tests)."""
import re
import subprocess
import sys


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "qlora_kernels.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_reports_version_paths_backends_threads():
    import qlora_kernels
    from qlora_kernels import _C

    r = _run("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"qlora-kernels {qlora_kernels.__version__}" in out
    assert "CPU paths compiled: " + ", ".join(_C.compiled_isas()) in out
    assert f"CPU path selected: {_C.get_isa()}" in out
    assert "backends available: reference, cpu, opencl, hls" in out
    assert "threads" in out


def test_bench_quick_writes_report_and_chart(tmp_path):
    r = _run("bench", "--quick", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "bench.md").read_text()
    assert "quantize_4bit" in md and "linear M=1" in md and "LoRA layer fwd+bwd" in md
    assert "bitsandbytes" in md and re.search(r"\| \d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\] \|", md)  # per-round ratios
    assert "% avx2 FMA peak" in md or "% avx512 FMA peak" in md or "% scalar FMA peak" in md  # fractions of peak
    assert (tmp_path / "bench.png").stat().st_size > 10_000
