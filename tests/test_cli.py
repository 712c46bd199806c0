"""The `qlora-kernels` command's info and bench subcommands (finetune and fpga-estimate
have their own tests)."""
import re
import subprocess
import sys

import pytest


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


@pytest.mark.parametrize("args", [("bench", "--threads", "-2"), ("info", "--peak", "--threads", "-1"),
                                  ("bench", "--threads", "two"), ("info", "--peak", "--threads", "5000000000")])
def test_a_bad_thread_count_is_one_line_not_a_traceback(args):
    r = _run(*args, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"argument --threads: {args[-1]!r} is not a thread count" in r.stderr


def test_bench_without_matplotlib_says_what_it_wrote(tmp_path, monkeypatch, capsys):
    from qlora_kernels import bench, cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    row = {"group": "g", "name": "peer", "median_s": 1e-3, "min_s": 1e-3, "max_s": 1e-3, "ratio": 0.5,
           "ratio_min": 0.4, "ratio_max": 0.6}
    monkeypatch.setattr(bench, "run", lambda quick=False: [row])
    assert cli.main(["bench", "--quick", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no chart" in out and f"wrote {tmp_path / 'bench.md'}\n" in out and "bench.png" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.md"]
    assert "bench.png" not in (tmp_path / "bench.md").read_text(), "bench.md links a chart that was not written"


def test_bench_output_in_the_way_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """A file at --output failed in makedirs after the whole run (the report lost)."""
    from qlora_kernels import bench, cli

    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    ran = []
    monkeypatch.setattr(bench, "run", lambda quick=False: ran.append(1) or [])
    assert cli.main(["bench", "--quick", "--output", str(blocker)]) == 2
    assert not ran and f"bench: --output {blocker}" in capsys.readouterr().err
    assert blocker.read_text() == "user data"
