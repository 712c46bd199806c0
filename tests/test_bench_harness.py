"""The benchmark harness: interleaved rounds with a rotating order, ratios taken round by
round, fractions of the machine's limits (on synthetic timings; no speed is judged here);
the AVX2 pairing's hold on bitsandbytes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kernels import bench, peak


def _cases(log):
    return [bench.Case("g", name, (lambda n=name: log.append(n)), name == "ours", 2e9, "GFLOP/s")
            for name in ("ours", "p1", "p2")]


def test_rounds_interleave_with_a_rotating_order():
    log = []
    times = bench.interleave(_cases(log), rounds=3, calls=1)
    assert log[:3] == ["ours", "p1", "p2"]  # warm-up
    assert log[3:] == ["ours", "p1", "p2", "p1", "p2", "ours", "p2", "ours", "p1"]
    assert all(len(v) == 3 for v in times.values())


def test_short_calls_are_timed_after_an_untimed_batch_of_their_own(monkeypatch):
    log = []
    clock = iter(range(1000))
    monkeypatch.setattr(bench.harness.time, "perf_counter", lambda: (log.append("clock"), next(clock))[1])
    times = bench.interleave(_cases(log), rounds=2, calls=2)
    one = lambda n: [n, n, "clock", n, n, "clock"]  # noqa: E731 - untimed batch, then the timed one
    assert log[3:] == one("ours") + one("p1") + one("p2") + one("p1") + one("p2") + one("ours")
    assert all(v == [0.5, 0.5] for v in times.values())  # each timed batch: 1 clock tick over 2 calls


def test_timed_batches():
    log = []
    assert bench.timed(lambda: log.append(1), 1) > 0 and len(log) == 1  # a long call: no untimed batch
    assert bench.timed(lambda: log.append(2), 3) > 0 and log[1:] == [2] * 6


def test_timed_takes_the_spans_a_case_reports():
    """A case that times a part of its call (bench.Span: the head + loss inside a training
    step) is timed by that part; a call without a span falls back to the wall time."""
    assert bench.timed(lambda: bench.Span(0.25), 1) == 0.25
    assert bench.timed(lambda: bench.Span(0.25), 3) == 0.25
    spans = iter([bench.Span(100.0), None] * 2)  # the untimed batch, then the timed one
    assert bench.timed(lambda: next(spans), 2) < 1.0  # one call without a span: the wall time


def test_the_loss_span_of_a_training_step(monkeypatch):
    """bench.train.step_fn(loss_span=True): the seconds from the final norm's output to the
    loss and back to that output's gradient, a part of the step, on the fused loss and on
    transformers' loss (our layers in both); the step itself trains as without the span.
    Sleeps placed in the head's forward and backward must land inside the span, sleeps in a
    layer's forward and the last layer's backward outside it."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_kernels.bench import train as bench_train
    from qlora_kernels.integrations import hf_loss

    nap = 0.05

    def sleep(*_args):
        time.sleep(nap)

    fused_loss = hf_loss.linear_cross_entropy

    def slow_backward_loss(*args, **kwargs):
        loss = fused_loss(*args, **kwargs)
        loss.register_hook(lambda _grad: sleep())  # the first thing the backward runs
        return loss

    monkeypatch.setattr(hf_loss, "linear_cross_entropy", slow_backward_loss)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for kind in ("ours-no-norm-mlp", "ours-unfused"):
        pm = bench_train.build(kind, base, "llama")
        assert hf_loss.is_fused(pm) == (kind == "ours-no-norm-mlp")
        step = bench_train.step_fn(pm, seq=32, vocab=300, loss_span=True)
        model = pm.get_base_model()
        model.model.layers[0].register_forward_pre_hook(sleep)  # outside
        model.model.layers[-1].register_full_backward_pre_hook(sleep)  # outside: after the norm's backward
        model.lm_head.register_forward_pre_hook(sleep)  # inside (the fused model calls its head as an identity)
        if kind == "ours-unfused":
            model.lm_head.register_full_backward_pre_hook(sleep)  # inside
        before = [p.detach().clone() for p in pm.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        span = step()
        wall = time.perf_counter() - t0
        assert isinstance(span, bench.Span), kind
        assert span >= 2 * nap and wall - span >= 2 * nap, (kind, span, wall)
        after = [p.detach() for p in pm.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), kind  # the step trained


def test_a_loss_span_worker_reply_is_read_as_a_span():
    """StepWorker(loss_span=True) reads the worker's "ok <seconds>" as a bench.Span, and a
    reply without the seconds as the worker's failure."""
    import io

    from qlora_kernels.bench.train import StepWorker

    class FakeProcess:
        def __init__(self, replies):
            self.stdin, self.stdout = io.StringIO(), io.StringIO(replies)

        def wait(self, timeout=None):
            return 0

    w = StepWorker("smollm2", "ours-unfused", loss_span=True)
    w.p = FakeProcess("ok 0.25\nok\n")
    span = w()
    assert isinstance(span, bench.Span) and span == 0.25 and w.p.stdin.getvalue() == "step\n"
    with pytest.raises(RuntimeError, match="no head \\+ loss seconds"):
        w()
    assert w.p is None
    plain = StepWorker("smollm2", "ours")
    plain.p = FakeProcess("ok\n")
    assert plain() is None


_WORKER = """
import json, sys
sys.path.insert(0, {benches!r})
import bnb_worker
bnb_worker.CASES["probe"] = lambda: (lambda: print("call", file=sys.stderr))
bnb_worker._warm_up = lambda fn: None
sys.argv = ["bnb_worker", "1"]
sys.exit(bnb_worker.main())
"""


def test_bnb_worker_times_as_the_harness_does():
    """benches/bnb_worker.py (the bitsandbytes plugin's benchmark side): short calls after an
    untimed batch of their own, as in interleave; replies on the protocol's stdout only."""
    benches = str(Path(__file__).resolve().parents[1] / "benches")
    out = subprocess.run([sys.executable, "-c", _WORKER.format(benches=benches)], capture_output=True, text=True,
                         timeout=300, input='{"case": "probe", "calls": 1}\n{"case": "probe", "calls": 3}\n')
    assert out.returncode == 0, out.stderr[-2000:]
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(replies) == 2 and all(r["seconds"] > 0 for r in replies)
    assert out.stderr.count("call\n") == 1 + 6


def test_a_step_worker_reports_its_failure_and_release_ends_workers():
    """bench.train.StepWorker (a training-step case in a process of its own): a worker that
    cannot build its case fails the first call with the worker's own error; release() closes
    every case that holds a process."""
    from qlora_kernels.bench.train import StepWorker

    w = StepWorker("no-such-model", "ours")
    with pytest.raises(RuntimeError, match="no-such-model ours 0 0: error ValueError: unknown model 'no-such-model'"):
        w()
    assert w.p is None  # closed after the failure
    closed = []

    class Held:
        def __call__(self):
            pass

        def close(self):
            closed.append(self)

    cases = [bench.Case("g", "a", Held(), True), bench.Case("g", "b", lambda: None, False)]
    bench.release(cases)
    assert closed == [cases[0].fn]


def test_ratios_are_taken_round_by_round():
    cases = _cases([])
    # a machine that slows down 3x in round 2 for everyone: per-round ratios stay 0.5
    times = {"ours": [1.0, 3.0, 1.0], "p1": [2.0, 6.0, 2.0], "p2": [1.0, 3.0, 4.0]}
    rows = {r["name"]: r for r in bench.group_rows(cases, times)}
    assert rows["p1"]["ratio"] == 0.5 and rows["p1"]["ratio_min"] == rows["p1"]["ratio_max"] == 0.5
    assert rows["p2"]["ratio"] == 1.0 and rows["p2"]["ratio_min"] == 0.25
    assert rows["ours"]["median_s"] == 1.0 and rows["ours"]["max_s"] == 3.0 and "ratio" not in rows["ours"]
    assert "| g | p1 | 2000.00 [2000.00-6000.00] |" in bench.format_table(list(rows.values()))


def test_fractions_of_the_machine_limits():
    p = peak.Peak(threads=2, fma_gflops={"scalar": 10.0, "avx2": 100.0}, bandwidth_gbs={"L3": 50.0, "DRAM": 10.0},
                  buffer_bytes={"L3": 1, "DRAM": 1}, caches={"L3": 32 << 20})
    gemm = bench.Case("g", "peer", lambda: None, False, 50e9, "GFLOP/s")
    assert bench.harness.limit_fraction(gemm, 1.0, p) == {"fraction": 0.5, "limit": "avx2 FMA peak"}
    gemv = bench.Case("g", "peer", lambda: None, False, 1e9, "GFLOP/s", {"stream_bytes": 5 << 20})
    f = bench.harness.limit_fraction(gemv, 1e-3, p)
    assert f["limit"] == "L3 bandwidth" and f["fraction"] == pytest.approx((5 << 20) / 1e-3 * 1e-9 / 50.0)


_HOLD = """
import json, sys
sys.path.insert(0, {benches!r})
import bnb_isa
summary = bnb_isa.hold_to_avx2()
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32).to("cpu").eval()
print(json.dumps({{"summary": summary, "bf16": bool(F.has_avx512bf16()),
                  "repacks": bool(layer.support_avx512bf16_for_cpu)}}))
"""


def test_bitsandbytes_held_to_avx2():
    """benches/bnb_isa.py (the AVX2 pairing's switch for bitsandbytes): in a fresh process,
    bitsandbytes' library answers "no AVX-512" to its own queries, Linear4bit stops choosing
    its AVX512-BF16 repacking, and its native FP4 decode shows the AVX2 kernel's -0.0 (the
    helper raises otherwise). Holding after bitsandbytes was imported is refused."""
    benches = str(Path(__file__).resolve().parents[1] / "benches")
    env = dict(os.environ, QLORA_KERNELS_BNB="0")
    out = subprocess.run([sys.executable, "-c", _HOLD.format(benches=benches)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "-0.0 for all 512 zero codes" in got["summary"]
    assert got["bf16"] is False and got["repacks"] is False
    late = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {benches!r}); import bitsandbytes, "
                           "bnb_isa; bnb_isa.hold_to_avx2()"], capture_output=True, text=True, env=env, timeout=300)
    assert late.returncode != 0 and "before importing it" in late.stderr


def test_the_lora_layer_group_quantizes_both_sides_alike():
    """The bitsandbytes peer had double quantization (Params4bit's default) and ours not:
    the peer decoded its nested absmax on every call and the ratio counted that against it."""
    from qlora_kernels.bench import linear as bench_linear

    cases = [c for c in bench_linear.lora_layer_cases(4, 64, 64, 4, 8) if "double_quant" in c.extra]
    assert len(cases) == 2 and {c.extra["double_quant"] for c in cases} == {True}, [(c.name, c.extra) for c in cases]
    for c in cases:
        c.fn()  # each side runs its forward and backward


def test_peak_is_measured_per_thread_count(monkeypatch):
    """measure() was cached by its argument: measure() at 1 thread, then at 2 threads, gave
    the 1-thread probes again."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(peak, "_measure", lambda threads, seconds: ("probe", threads))
    try:
        torch.set_num_threads(1)
        one = peak.measure()
        torch.set_num_threads(2)
        two = peak.measure()
    finally:
        torch.set_num_threads(before)
    assert one == ("probe", 1) and two == ("probe", 2)


def test_report_prints_interleaved_and_sequential_benchmarks(tmp_path):
    """A JSON of several suites (benches/report.py's own docstring) holds both kinds: the
    sequential ones were dropped, and the header's "calls" was the first group's for all."""
    row = {"group": "g1", "name": "ours", "ours": True, "median_s": 1e-3, "min_s": 1e-3, "max_s": 1e-3}
    data = {"machine_info": {}, "datetime": "now", "benchmarks": [
        {"group": "g1", "name": "x", "stats": {"median": 1e-3}, "extra_info": {
            "interleaved": [row], "rounds": 7, "calls": 20, "peak": "PEAK TABLE"}},
        {"group": "g2", "name": "y", "stats": {"median": 2e-3}, "extra_info": {"interleaved": [
            dict(row, group="g2")], "rounds": 7, "calls": 1}},
        {"group": "quant", "name": "qlora-kernels quantize", "stats": {"median": 5e-3},
         "extra_info": {"ours": True}},
        {"group": "quant", "name": "bitsandbytes quantize", "stats": {"median": 1e-1}, "extra_info": {}}]}
    f = tmp_path / "mixed.json"
    f.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benches" / "report.py"), str(f)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "| g1 |" in text and "| g2 |" in text and "| quant | bitsandbytes quantize |" in text, text
    assert "PEAK TABLE" in text and "1 or 20 calls or more back to back, by group" in text, text


def test_a_case_on_another_thread_count_is_held_to_that_counts_peak(monkeypatch):
    """The thread-scaling group's 1-thread row was divided by the 2-thread peak (50% where it
    ran at its own peak)."""
    def fake(threads, seconds=0.1):
        return peak.Peak(threads=threads, fma_gflops={"avx2": 100.0 * threads}, bandwidth_gbs={}, buffer_bytes={})

    monkeypatch.setattr(peak, "measure", fake)
    monkeypatch.setattr("qlora_kernels._C.get_isa", lambda: "avx2")
    one = bench.Case("g", "qlora-kernels 1 thread", lambda: None, True, 100e9, "GFLOP/s", {"threads": 1})
    two = bench.Case("g", "qlora-kernels 2 threads", lambda: None, True, 200e9, "GFLOP/s", {"threads": 2})
    assert bench.harness.limit_fraction(one, 1.0, fake(2))["fraction"] == pytest.approx(1.0)
    assert bench.harness.limit_fraction(two, 1.0, fake(2))["fraction"] == pytest.approx(1.0)
