"""qlora_kernels.optim.AdamW: torch.optim.AdamW's update (decoupled weight decay, bias
correction as torch computes it, no amsgrad) run by one fused multi-tensor kernel of the
selected backend (``cpu``: csrc/adamw_*.cpp, ``opencl``: kernels/adamw.cl, ``reference``:
pure torch). The state uses torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``) and
tensors, so a state_dict moves between this optimizer and torch.optim.AdamW both ways."""
from __future__ import annotations

import math

import torch

from .. import backends

# Keys torch.optim.AdamW keeps in each param group; filled in so that a state_dict saved
# here loads into torch's optimizer without touching its defaults.
_TORCH_GROUP_KEYS = dict(amsgrad=False, foreach=None, capturable=False, differentiable=False, fused=None,
                         decoupled_weight_decay=True)


def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"AdamW: {name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"AdamW: {name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(out):
        raise ValueError(f"AdamW: {name} must be finite, got {out}")
    return out


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if _number("lr", lr) < 0:
        raise ValueError(f"AdamW: invalid learning rate (lr) {lr}: must be >= 0")
    if _number("eps", eps) < 0:
        raise ValueError(f"AdamW: invalid eps {eps}: must be >= 0")
    if _number("weight_decay", weight_decay) < 0:
        raise ValueError(f"AdamW: invalid weight_decay {weight_decay}: must be >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= _number(f"betas[{i}]", b) < 1.0:
            raise ValueError(f"AdamW: invalid beta parameter at index {i}: {b} (must be in [0, 1))")


def _refuse_unsupported(group: dict, where: str = "AdamW") -> None:
    """What this optimizer cannot do, refused wherever a group's settings arrive (the
    constructor, add_param_group, load_state_dict): accepted and ignored, each would give
    another update than torch's with no error."""
    if group.get("amsgrad"):
        raise ValueError(f"{where}: amsgrad=True is not supported by qlora_kernels.optim.AdamW; "
                         "use torch.optim.AdamW(amsgrad=True)")
    if group.get("decoupled_weight_decay", True) is False:
        raise ValueError(f"{where}: decoupled_weight_decay=False (Adam's L2 penalty, e.g. a torch.optim.Adam "
                         "state) is not supported: this optimizer always decouples weight decay as AdamW does")
    if group.get("differentiable"):
        raise ValueError(f"{where}: differentiable=True is not supported (the fused kernel's step is not "
                         "differentiable); use torch.optim.AdamW")
    if group.get("capturable"):
        raise ValueError(f"{where}: capturable=True is for CUDA graphs; this optimizer runs on CPU tensors")


class AdamW(torch.optim.Optimizer):
    """Fused AdamW for fp32 CPU parameters (the adapter weights of a QLoRA model).

    Arguments are torch.optim.AdamW's. ``amsgrad=True``, ``differentiable=True`` and
    ``capturable=True`` are refused (use torch.optim.AdamW for them); ``foreach`` and
    ``fused`` choose among torch's implementations and are accepted and kept in the groups
    (the update here is always one fused kernel); ``backend`` picks that kernel (default: the
    selected qlora_kernels backend).
    Sparse gradients, non-fp32 or non-CPU parameters raise; non-contiguous parameters,
    gradients or state are updated through contiguous copies.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, backend: str | None = None):
        _check_hyper(lr, betas, eps, weight_decay)
        torch_keys = dict(_TORCH_GROUP_KEYS, amsgrad=amsgrad, foreach=foreach, capturable=capturable,
                          differentiable=differentiable, fused=fused)
        _refuse_unsupported(torch_keys)
        if backend is not None:
            backends._check(backend)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=bool(maximize),
                        backend=backend, **torch_keys)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # A group added later (torch fills it from the defaults) gets the constructor's checks:
        # its amsgrad=True was once accepted and silently not applied.
        given = {k: v for k, v in param_group.items() if k != "params"}
        if given:
            merged = {**self.defaults, **given}
            _refuse_unsupported(merged)
            _check_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
            if merged.get("backend") is not None:
                backends._check(merged["backend"])
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("backend", self.defaults.get("backend"))
            for key, value in _TORCH_GROUP_KEYS.items():
                group.setdefault(key, value)
            # Older torch (and some converters) saved ``step`` as a plain number; the update reads
            # and advances it as a tensor, so it is converted here as torch.optim.Adam does
            # (load_state_dict ends in this method too).
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def load_state_dict(self, state_dict):
        # Checked before loading: a refused state must leave the optimizer as it was.
        for group in state_dict.get("param_groups", []):
            _refuse_unsupported(group, "AdamW: the loaded state")
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a state_dict of torch.optim.AdamW has no backend key: keep ours
            group.setdefault("backend", self.defaults["backend"])

    def _gather(self, group, gi: int = 0):
        from torch.distributed.tensor import DTensor

        # FSDP2 hands DTensor parameters; the update is elementwise, so each rank updates
        # its local shard (the state stays DTensor, as torch's AdamW keeps it).
        def local(t):
            return t.to_local() if isinstance(t, DTensor) else t

        rows, wheres = [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"AdamW: parameter {i} of group {gi} (shape {tuple(p.shape)})"
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_t = state["step"]
            p, g = local(p), local(p.grad)
            if g.is_sparse:
                raise RuntimeError(f"{where}: AdamW does not support sparse gradients")
            if p.device.type != "cpu" or g.device.type != "cpu":
                raise ValueError(f"{where}: parameters and gradients must be CPU tensors, got {p.device}/{g.device}")
            if p.dtype != torch.float32 or g.dtype != torch.float32:
                raise TypeError(f"{where}: parameters and gradients must be float32, got {p.dtype}/{g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"{where}: gradient shape {tuple(g.shape)} does not match the parameter")
            moments = [local(state["exp_avg"]), local(state["exp_avg_sq"])]
            for key, s in zip(("exp_avg", "exp_avg_sq"), moments):
                if s.shape != p.shape or s.dtype != torch.float32 or s.device.type != "cpu":
                    raise ValueError(f"{where}: state {key!r} must be a float32 CPU tensor of the parameter's shape")
            rows.append((p, g, *moments, step_t))
            wheres.append(where)
        return rows, wheres

    @staticmethod
    def _check_overlap(rows, wheres) -> None:
        """Every group's tensors, before any group is updated: a parameter or moment that
        shares memory with another tensor of the step would race with itself in the kernel
        (a parameter listed twice: torch.optim.AdamW warns and steps it twice). The kernel
        checks its own call too; this check names the parameters and runs before anything moves."""
        spans = []
        for r, (row, where) in enumerate(zip(rows, wheres)):
            for k, t in enumerate(row[:4]):
                if t.numel() and t.is_contiguous():  # others go to the kernel as copies
                    start = t.data_ptr()
                    spans.append((start, start + t.numel() * t.element_size(), k != 1, r, where))
        spans.sort(key=lambda s: s[0])
        end_all = end_written = 0
        by_all = by_written = None
        for start, end, written, r, where in spans:
            other = by_written if start < end_written else by_all if written and start < end_all else None
            if other is not None and other[0] != r:
                raise ValueError(f"{where} shares memory with {other[1]} (listed twice, or views of one tensor): "
                                 "the update would race with itself")
            if end > end_all:
                end_all, by_all = end, (r, where)
            if written and end > end_written:
                end_written, by_written = end, (r, where)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked (parameters, state, hyperparameters, kernel) before any step
        # counter advances or any parameter moves: a refused step() leaves the optimizer as it
        # was, so the next accepted one counts as torch's would (bias correction uses the step).
        plans, every_row, every_where = [], [], []
        for gi, group in enumerate(self.param_groups):
            rows, wheres = self._gather(group, gi)
            if not rows:
                continue
            every_row += rows
            every_where += wheres
            hyper = (_number("lr", group["lr"]), *(_number(f"betas[{i}]", b) for i, b in enumerate(group["betas"])),
                     _number("eps", group["eps"]), _number("weight_decay", group["weight_decay"]))
            plans.append((rows, hyper, bool(group["maximize"]), backends.kernel_for("adamw_step", group["backend"])[1]))
        self._check_overlap(every_row, every_where)
        for rows, hyper, maximize, kernel in plans:
            for row in rows:
                row[4].add_(1)
            try:
                self._run(kernel, rows, hyper, maximize)
            except Exception:
                # A kernel that refuses its inputs (it checks them before writing) leaves the
                # counters where they were.
                for row in rows:
                    row[4].sub_(1)
                raise
        return loss

    @staticmethod
    def _run(kernel, rows, hyper, maximize) -> None:
        # Kernels write through data pointers: non-contiguous tensors go through
        # contiguous copies, written back afterwards.
        work = [[t if t.is_contiguous() else t.contiguous() for t in row[:4]] for row in rows]
        kernel([w[0] for w in work], [w[1] for w in work], [w[2] for w in work], [w[3] for w in work],
               [float(row[4]) for row in rows], *hyper, maximize)
        for row, w in zip(rows, work):
            for k in (0, 2, 3):
                if w[k] is not row[k]:
                    row[k].copy_(w[k])
