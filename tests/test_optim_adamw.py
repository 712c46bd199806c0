"""qlora_kernels.optim.AdamW against torch.optim.AdamW and the pure-torch oracle, on every
backend/ISA path this machine runs: 20 steps, parameters and both moments."""
from __future__ import annotations

import copy

import pytest
import torch

from qlora_kernels import _C
from qlora_kernels.optim import AdamW

from .conftest import on_path

# Torch's own single-tensor, foreach and fused paths differ from each other by a few fp32
# ulps per step (FMA or not in the lerp, reciprocal vs division); after 20 steps of
# lr=1e-2 the parameters agree to this bound; the moments (gradients ~ N(0, 1)) to a few
# ulps of their unit-scale terms (a moment near 0 is the cancellation of such terms).
PARAM_ATOL = 2e-6
MOMENT_RTOL, MOMENT_ATOL = 1e-5, 1e-6
SHAPES = [(1,), (7,), (4097,), (33, 65), (16, 1024)]
PATHS = [("reference", None)] + [("cpu", isa) for isa in _C.supported_isas()]


def _params(seed: int, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _twins(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def _run(opts_and_params, steps=20, seed=1, none_every=None):
    gen = torch.Generator().manual_seed(seed)
    for s in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in opts_and_params[0][1]]
        for opt, params in opts_and_params:
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if none_every and (s + i) % none_every == 0 else g.clone()
            opt.step()


def _assert_close(o1, ps1, o2, ps2):
    for p, q in zip(ps1, ps2):
        torch.testing.assert_close(p.detach(), q.detach(), atol=PARAM_ATOL, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o1.state[p][key], o2.state[q][key], rtol=MOMENT_RTOL, atol=MOMENT_ATOL)
        assert float(o1.state[p]["step"]) == float(o2.state[q]["step"])


@pytest.mark.parametrize("backend,isa", PATHS, ids=[b if i is None else f"{b}-{i}" for b, i in PATHS])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_adamw(backend, isa, weight_decay, maximize):
    ps, qs = _params(0), None
    qs = _twins(ps)
    with on_path(backend, isa):
        ours = AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, maximize=maximize,
                     backend=backend)
        ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                                maximize=maximize)
        _run([(ours, ps), (ref, qs)])
    _assert_close(ours, ps, ref, qs)
    moved = max((p.detach() - q0).abs().max().item() for p, q0 in zip(ps, _params(0)))
    assert moved > 0.05  # 20 steps of lr=1e-2 really moved the weights


@pytest.mark.parametrize("isa", _C.supported_isas())
def test_native_paths_match_the_oracle(isa):
    """Each ISA path against the pure-torch oracle, with param groups of different lr
    and weight decay and gradients that are sometimes None (skipped, step not advanced)."""
    ps = _params(3)
    qs = _twins(ps)

    def groups(params):
        return [{"params": params[:2], "lr": 3e-2, "weight_decay": 0.0}, {"params": params[2:]}]

    with on_path("cpu", isa):
        ours = AdamW(groups(ps), lr=1e-3, weight_decay=0.05, backend="cpu")
    oracle = AdamW(groups(qs), lr=1e-3, weight_decay=0.05, backend="reference")
    with on_path("cpu", isa):
        _run([(ours, ps), (oracle, qs)], none_every=3)
    _assert_close(ours, ps, oracle, qs)
    assert {float(ours.state[p]["step"]) for p in ps} != {20.0}  # some steps were skipped


def test_state_dict_round_trips_with_torch():
    ps = _params(5, [(8, 8), (3,)])
    ours = AdamW(ps, lr=1e-2)
    _run([(ours, ps)], steps=3)
    qs = _twins(ps)
    ref = torch.optim.AdamW(qs, lr=1e-2)
    # deepcopy: as after a save/load; load_state_dict keeps the saved tensors themselves
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))  # ours -> torch
    back = AdamW(_twins(ps), lr=5.0)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch -> ours
    assert back.param_groups[0]["lr"] == 1e-2
    rs = back.param_groups[0]["params"]
    _run([(ours, ps), (ref, qs), (back, rs)], steps=5, seed=9)
    _assert_close(ours, ps, ref, qs)
    _assert_close(ours, ps, back, rs)


def test_non_contiguous_parameters_are_updated_in_place():
    base = torch.randn(12, 10)
    p = base.t().requires_grad_()  # non-contiguous leaf view
    q = p.detach().clone().requires_grad_()
    ours, ref = AdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2)
    _run([(ours, [p]), (ref, [q])], steps=4)
    torch.testing.assert_close(p.detach(), q.detach(), atol=PARAM_ATOL, rtol=0)
    assert p.data_ptr() == base.data_ptr()


def test_empty_and_no_grad_steps():
    p = torch.zeros(0, requires_grad=True)
    q = torch.randn(4, requires_grad=True)
    before = q.detach().clone()
    opt = AdamW([p, q])
    p.grad = torch.zeros(0)
    opt.step()  # q has no grad: untouched and no state
    assert torch.equal(q.detach(), before) and q not in opt.state
    assert opt.step(lambda: torch.tensor(3.0)) == torch.tensor(3.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(lr=-1.0), "learning rate"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(1.0, 0.999)), "index 0"),
    (dict(betas=(0.9,)), "pair"),
    (dict(lr=float("nan")), "finite"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(decoupled_weight_decay=False), "decoupled_weight_decay"),
    (dict(differentiable=True), "differentiable"),
    (dict(capturable=True), "capturable"),
])
def test_bad_hyperparameters(kwargs, match):
    if "decoupled_weight_decay" not in kwargs:  # not one of torch.optim.AdamW's arguments, a group key only
        with pytest.raises((ValueError, TypeError), match=match):
            AdamW([torch.zeros(2, requires_grad=True)], **kwargs)
    # the same values in a group added later (amsgrad=True there was once silently not applied)
    opt = AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises((ValueError, TypeError), match=match):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1


def test_bad_gradients():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters()).step()
    h = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    h.grad = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        AdamW([h]).step()
    d = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    d.grad = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        AdamW([d]).step()
    m = torch.zeros(4, device="meta", requires_grad=True)
    m.grad = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        AdamW([m]).step()


def test_native_binding_rejects_overlaps_and_bad_sizes():
    p, g, m, v = (torch.zeros(32) for _ in range(4))
    ptrs = lambda *ts: [t.data_ptr() for t in ts]  # noqa: E731
    with pytest.raises(ValueError, match="overlap"):
        _C.adamw_step(ptrs(p), ptrs(g), ptrs(p), ptrs(v), [32], [1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match="same length"):
        _C.adamw_step(ptrs(p), ptrs(g), ptrs(m), [], [32], [1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match="steps"):
        _C.adamw_step(ptrs(p), ptrs(g), ptrs(m), ptrs(v), [32], [0.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    with pytest.raises(ValueError, match="aligned"):
        _C.adamw_step([p.data_ptr() + 1], ptrs(g), ptrs(m), ptrs(v), [4], [1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                      False, 1)
    with pytest.raises(ValueError, match="betas"):
        _C.adamw_step(ptrs(p), ptrs(g), ptrs(m), ptrs(v), [32], [1.0], 1e-3, 1.5, 0.999, 1e-8, 0.0, False, 1)


@pytest.mark.parametrize("style", ["ndrange", "fpga"])
def test_opencl_matches_the_oracle(style):
    """kernels/adamw.cl (both kernel styles, PoCL here) against the pure-torch oracle."""
    import qlora_kernels as qk
    from qlora_kernels import opencl as ocl

    reason = qk.unavailable_reason("opencl")
    assert reason is None, f"the opencl backend must run here (CI installs PoCL): {reason}"
    ps = _params(7)
    qs = _twins(ps)
    groups = lambda params: [{"params": params[:3], "lr": 2e-2}, {"params": params[3:], "weight_decay": 0.0}]  # noqa: E731
    with ocl.use_style(style):
        ours = AdamW(groups(ps), lr=1e-2, weight_decay=0.1, backend="opencl")
        oracle = AdamW(groups(qs), lr=1e-2, weight_decay=0.1, backend="reference")
        _run([(ours, ps), (oracle, qs)], none_every=4)
    _assert_close(ours, ps, oracle, qs)
    assert ocl.stats()["programs"].count("adamw") == 1


def test_refused_step_does_not_advance_the_step_count():
    # The step counters were advanced before lr/betas/kernel were checked: after a refused
    # step() the next accepted one used step=2 (torch: 1) in its bias correction.
    ps = _params(3, [(5,), (2, 3)])
    qs = _twins(ps)
    ours = AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=1e-2, backend="reference")
    ref = torch.optim.AdamW([{"params": qs[:1]}, {"params": qs[1:]}], lr=1e-2)
    for p in ps:
        p.grad = torch.ones_like(p)
    ours.param_groups[1]["lr"] = float("inf")  # the second group refuses: the first must not move either
    with pytest.raises(ValueError, match="finite"):
        ours.step()
    assert all(float(ours.state[p]["step"]) == 0 for p in ps)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    ours.param_groups[1]["lr"] = 1e-2
    _run([(ours, ps), (ref, qs)], steps=3)
    _assert_close(ours, ps, ref, qs)


def test_state_dict_with_a_plain_number_step_loads_as_torch_does():
    # torch < 1.12 (and some converters) saved ``step`` as a number; step() then failed with
    # AttributeError on it. torch.optim.AdamW converts it to a tensor when loading.
    ps = _params(4, [(4, 4), (3,)])
    qs = _twins(ps)
    donor = torch.optim.AdamW(_twins(ps), lr=1e-2)
    _run([(donor, donor.param_groups[0]["params"])], steps=2)
    sd = donor.state_dict()
    for s in sd["state"].values():
        s["step"] = int(s["step"])
    ours, ref = AdamW(ps, lr=1e-2, backend="reference"), torch.optim.AdamW(qs, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    assert all(torch.is_tensor(ours.state[p]["step"]) for p in ps)
    _run([(ours, ps), (ref, qs)], steps=3)
    _assert_close(ours, ps, ref, qs)
    assert float(ours.state[ps[0]]["step"]) == 5


def test_torch_implementation_choices_are_accepted():
    """foreach/fused pick among torch's implementations, not the update: accepted and kept,
    so code written for torch.optim.AdamW runs unchanged and its state loads back into it."""
    ps = _params(5, [(6,), (2, 3)])
    qs = _twins(ps)
    ours = AdamW(ps, lr=1e-2, foreach=False, fused=None, capturable=False, differentiable=False, backend="reference")
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    _run([(ours, ps), (ref, qs)], steps=3)
    _assert_close(ours, ps, ref, qs)
    torch.optim.AdamW(_twins(ps), lr=1e-2).load_state_dict(ours.state_dict())


def test_refused_state_dicts_leave_the_optimizer_as_it_was():
    """An Adam state (L2 weight decay, not decoupled) or an amsgrad one was loaded before it
    was refused (or not refused at all): the next steps then ran another update than the
    state's owner with no error."""
    ps = _params(6, [(4,), (3,)])
    ours = AdamW(ps, lr=1e-2, backend="reference")
    for p in ps:
        p.grad = torch.ones_like(p)
    ours.step()
    before = copy.deepcopy(ours.state_dict())
    for make in (lambda q: torch.optim.Adam(q, lr=1e-2, weight_decay=0.5),
                 lambda q: torch.optim.AdamW(q, lr=1e-2, amsgrad=True)):
        qs = _twins(ps)
        donor = make(qs)
        _run([(donor, qs)], steps=2)
        with pytest.raises(ValueError, match="decoupled_weight_decay|amsgrad"):
            ours.load_state_dict(donor.state_dict())
        after = ours.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for k, st in before["state"].items():
            assert set(after["state"][k]) == set(st)
            assert all(torch.equal(after["state"][k][n], st[n]) for n in st)


def test_loading_torchs_state_keeps_the_chosen_backend():
    ps = _params(8, [(5,)])
    donor = torch.optim.AdamW(_twins(ps), lr=1e-2)
    _run([(donor, donor.param_groups[0]["params"])], steps=1)
    ours = AdamW(ps, lr=1e-2, backend="reference")
    ours.load_state_dict(donor.state_dict())
    assert ours.param_groups[0]["backend"] == "reference"


def test_a_parameter_listed_twice_is_refused_before_any_group_moves():
    """The native kernel refused the overlapping group only when its turn came: the groups
    before it had already been updated, and its message counted only parameters with a
    gradient. Now every group is checked first and the message names both parameters."""
    a, b = _params(9, [(4,), (6,)])
    frozen = torch.zeros(3, requires_grad=True)  # no grad: must not shift the positions named
    opt = AdamW([{"params": [a]}, {"params": [frozen, b]}], lr=1e-2, backend="reference")
    opt.param_groups[1]["params"].append(b)  # torch itself only warns about duplicates here
    view = a.detach()[1:3]
    for p in (a, b):
        p.grad = torch.ones_like(p)
    a0 = a.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 2 of group 1 .*shares memory with AdamW: parameter 1 of group 1"):
        opt.step()
    assert torch.equal(a.detach(), a0) and float(opt.state[a].get("step", 0)) == 0
    opt.param_groups[1]["params"].pop()
    w = view.requires_grad_()
    w.grad = torch.ones_like(w)
    opt.add_param_group({"params": [w]})
    with pytest.raises(ValueError, match="shares memory"):
        opt.step()
    assert torch.equal(a.detach(), a0)
