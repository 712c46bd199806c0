"""A prepared 4-bit weight: what every call on one weight would otherwise derive again
(the arguments checked, the codebook compared with the format's, the fp32 absmax with
double quantization decoded, the cpu kernels looked up, the one-row int8 repack, DoRA's
row norms), made once and held by the owner of the weight: ``Linear4bit``, or the caller
of ``prepare_4bit`` (torchao's prepacked weights and ONNX Runtime's prepacking work the
same way). There is no global cache.

A prepared weight keeps references to the tensors it was made from, with their version
counters and data pointers. ``current()`` says whether they are still the same objects
with the same contents as far as torch can tell: a new tensor (even at a freed one's
address) is another object, an in-place edit bumps the version counter, and a swapped
storage (``param.data = ...``, as ZeRO-3 does around a forward) moves the data pointer.
Its owner prepares again when it is not current."""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from . import _env, formats
from ._versions import version_of
from .ops import linear as ops_linear
from .ops.checks import FLOATS
from . import backends as _backends
from .formats import QuantState

# Tensors whose storage we may read directly (a subclass such as a FakeTensor or DTensor has
# no data pointer to speak of: its version counter alone marks a change).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

# Bytes kept in another dtype (bitsandbytes' quant_storage) are read as uint8.
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)

# Whether one-row compute="int8" calls may keep a repacked copy of their weight (see
# int8_repack); QLORA_KERNELS_INT8_REPACK=0 starts with it off. The generation counts
# changes, so a prepared weight drops a copy made under an earlier setting.
_INT8_REPACK = {"on": _env.switch(_env.INT8_REPACK, True), "generation": 0}


try:
    from . import _C
except ImportError:  # the reference backend alone
    _C = None


def _cpu_path() -> str | None:
    """The cpu backend's ISA path in force (None without the extension)."""
    return None if _C is None else _C.get_isa()


def int8_repack(enabled: bool | None = None) -> bool:
    """Whether ``linear_4bit(..., compute="int8")`` on one row of x may run on a repacked
    copy of a prepared weight (on AVX2 and AVX-512 CPUs, ~0.6x of the time of the
    bitsandbytes layout's kernel at 4096x4096; the copy is about the size of ``packed``,
    rows padded to whole panels of 16 blocks, and lives with the prepared weight).
    ``int8_repack(False)`` turns it off; each weight's copy is dropped at its next call.
    ``QLORA_KERNELS_INT8_REPACK=0`` starts with it off. Returns the setting in force."""
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool or None, got {type(enabled).__name__}")
        if enabled != _INT8_REPACK["on"]:
            _INT8_REPACK.update(on=enabled, generation=_INT8_REPACK["generation"] + 1)
    return _INT8_REPACK["on"]


def check_state(state: QuantState) -> None:
    """A whole state, its codebook values included. The value check is data-dependent:
    it runs on eager calls with real tensors, and is skipped while tracing (torch.compile,
    fake tensors and other dispatch modes, a meta state), where the shapes are checked."""
    if not isinstance(state, QuantState):
        raise TypeError(
            f"state must be a qlora_kernels.QuantState, got {type(state).__name__}"
            " (convert a bitsandbytes state with QuantState.from_dict(bnb_state.as_dict()))"
        )
    state.validate()
    code = state.code
    if (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and type(code) is torch.Tensor and code.device.type != "meta"):
        if not torch.equal(state.code.float().cpu(), formats.codebook_cpu(state.quant_type)):
            raise ValueError(f"state.code is not the {state.quant_type} codebook")


def value_problem(state: QuantState) -> tuple[str, str] | None:
    """(key, reason) for a loaded state whose values no forward could use: NaN/Inf scales
    (the outputs then NaN with every key reported matched) or a codebook that is not its
    quant type's (the first forward failed, naming no key). Not run on meta tensors. Checked
    by Linear4bit.load_state_dict and by the transformers integration's checkpoint load."""
    if state.code.device.type == "meta":
        return None
    if not torch.equal(state.code.float().cpu(), formats.codebook_cpu(state.quant_type)):
        return "quant_map", f"not the {state.quant_type} codebook"
    if state.nested:
        if not torch.isfinite(state.state2.absmax).all() or not torch.isfinite(state.offset).all():
            return "nested_absmax", "holds NaN or Inf"
    elif not torch.isfinite(state.absmax).all():
        return "absmax", "holds NaN or Inf"
    return None


def decode_absmax(state: QuantState) -> torch.Tensor:
    """The per-block fp32 absmax of a checked state; decodes double quantization the way
    bitsandbytes does (8-bit decode, then ``+ offset`` in fp32)."""
    if not state.nested:
        return state.absmax
    s2 = state.state2
    absmax = torch.ops.qlora_kernels.dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize)
    return absmax + state.offset.float()


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype in _STORAGE_DTYPES and packed.is_contiguous():
        return packed.view(torch.uint8)
    raise TypeError(f"packed must hold uint8 bytes, got {packed.dtype}")


def _sources(packed: torch.Tensor, state: QuantState) -> tuple:
    s2 = state.state2
    return (packed, state.absmax, state.code, state.offset, s2, None if s2 is None else s2.absmax,
            None if s2 is None else s2.code)


def _tensors(sources: tuple) -> tuple:
    return tuple(t for t in sources if t is not None and not isinstance(t, QuantState))


def _fields(state: QuantState) -> tuple:
    """The state's plain fields, as a prepared weight compares them on every call."""
    return state.blocksize, state.quant_type, None if state.shape is None else tuple(state.shape), state.dtype


def _tensor_marks(tensors: tuple) -> tuple:
    """What changes when a source tensor is edited or re-pointed: (tensor, version counter,
    data pointer (``_ptr``: 0 for a tensor subclass, whose version counter and size alone
    mark a change), element count). The count matters to the kernels bound to the weight,
    which keep the sizes they were bound with (a smaller storage at a freed one's address
    keeps the pointer)."""
    return tuple((t, version_of(t), _ptr(t), t.numel()) for t in tensors)



def _tensors_unchanged(marks: tuple) -> bool:
    # Runs on every call of a prepared weight: a plain loop over a few cheap reads (a
    # tuple of fresh marks to compare cost twice as much at one row of a small layer).
    for t, version, ptr, numel in marks:
        if (version >= 0 and t._version != version) or (ptr and t.data_ptr() != ptr) or t.numel() != numel:
            return False
    return True


def _unbound(kernel: Callable, args: tuple, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return kernel(x, *args, bias)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr() if type(t) in _PLAIN_TYPES else 0


class Prepared4bit:
    """A checked 4-bit linear weight ``[out_features, in_features]`` and what is derived
    from it. Made by ``prepare_4bit``; pass it as ``packed`` (with ``state=None``) to
    ``linear_4bit`` and ``lora_linear_4bit``."""

    __slots__ = ("state", "packed", "absmax", "blocksize", "quant_type", "out_features", "in_features", "derived",
                 "_sources", "_fields", "_marks", "_pmarks", "_kernels", "_int8", "_one_call")

    def __init__(self, packed: torch.Tensor, state: QuantState, _absmax: Optional[torch.Tensor] = None):
        if _absmax is None:  # else: refreshed() after a change of the bytes alone, the state checked before
            check_state(state)
            if len(state.shape) != 2:
                raise ValueError(f"state.shape must be [out_features, in_features] for a linear layer, got "
                                 f"{tuple(state.shape)}")
        self.state = state
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():  # dynamo refuses the query
            # A weight first used under torch.inference_mode keeps what it derives for later calls
            # in grad mode too, where autograd cannot save an inference tensor: made as normal ones.
            with torch.inference_mode(False):
                self.packed = packed_bytes(packed)
                self.absmax = decode_absmax(state) if _absmax is None else _absmax
        else:
            self.packed = packed_bytes(packed)
            self.absmax = decode_absmax(state) if _absmax is None else _absmax
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        self._sources = _sources(packed, state)
        self._fields = _fields(state)
        self._marks = _tensor_marks(_tensors(self._sources[1:]))
        self._pmarks = (version_of(packed), _ptr(packed), packed.numel())
        # Values derived from this weight by other modules (DoRA's base row norms), named;
        # they go with the prepared weight when it is replaced.
        self.derived: dict = {}
        self._kernels: Optional[dict] = None
        self._int8 = None
        self._one_call = False  # made by resolve() for a single call: it keeps no copies

    def __getstate__(self) -> dict:
        # The kernels bound to this process's pointers and the int8 copy's closure are made
        # again on first use after unpickling (the unpickled tensors are new objects, so the
        # weight is not current and prepares again anyway).
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("_kernels", "_int8")}

    def __setstate__(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
        self._kernels, self._int8 = None, None

    def made_from(self, packed: torch.Tensor, state: QuantState) -> bool:
        """Whether ``packed`` and ``state`` are the very objects this was prepared from
        (their contents are ``current``'s to judge)."""
        return packed is self._sources[0] and state is self.state

    def current(self, packed: Optional[torch.Tensor] = None, state: Optional[QuantState] = None,
                eager: bool = False) -> bool:
        """Whether this was prepared from ``packed`` and ``state`` (default: its own sources)
        and none of their tensors changed since (``eager``: the caller knows it is not being
        compiled)."""
        src = self._sources
        if packed is not None and (packed is not src[0] or state is not self.state):
            return False
        if not eager and torch.compiler.is_compiling():
            # Version counters and data pointers are not traceable; a compiled graph guards
            # on its inputs itself.
            return True
        p = src[0]
        return (version_of(p), _ptr(p), p.numel()) == self._pmarks and self._state_unchanged()

    def _state_unchanged(self) -> bool:
        src, state = self._sources, self.state
        s2 = state.state2
        if (state.absmax is not src[1] or state.code is not src[2] or state.offset is not src[3]
                or s2 is not src[4] or (s2 is not None and (s2.absmax is not src[5] or s2.code is not src[6]))):
            return False
        return _fields(state) == self._fields and _tensors_unchanged(self._marks)

    def refreshed(self) -> "Prepared4bit":
        """Itself, prepared again from its sources first if they changed (what was derived
        from the old contents goes with them). When only the packed bytes changed, the
        decoded absmax is kept: a backend that keeps device copies of it (OpenCL) then
        uploads the bytes alone."""
        if not self.current():
            keep = self.absmax if self._state_unchanged() else None
            self.__init__(self._sources[0], self.state, keep)
        return self

    def args(self) -> tuple:
        """The weight arguments of the linear ops: packed, absmax, blocksize, quant_type, out_features."""
        return self.packed, self.absmax, self.blocksize, self.quant_type, self.out_features

    # -- the direct path: eager fp32 inference on the cpu backend ------------------------------
    def kernels(self) -> dict:
        """compute -> the cpu backend's kernel: "fp32" and "int8" as ``f(x, bias)`` on this
        weight, "lora" as lora_linear_4bit's kernel; or {} when the cpu kernels do not take
        this weight as it is (double quantization decoded here is fine; strided bytes,
        another device or a tensor subclass are not: those go through the op)."""
        if self._kernels is None:
            self._kernels = {}
            plain = all(type(t) in _PLAIN_TYPES and t.is_cpu and t.is_contiguous()
                        for t in (self.packed, self.absmax))  # not meta, not a tensor subclass
            if plain:
                bind_backend, bind = _backends.kernel_for("linear_4bit_bind", "cpu")
                for compute, op in (("fp32", "linear_4bit"), ("int8", "linear_4bit_int8"),
                                    ("lora", "lora_linear_4bit")):
                    backend, fn = _backends.kernel_for(op, "cpu")
                    if backend != "cpu":
                        continue
                    if compute != "lora":  # f(x, bias): bound to this weight where the backend can
                        bound = bind(compute, *self.args()) if bind_backend == "cpu" else None
                        fn = bound or functools.partial(_unbound, fn, self.args())
                    self._kernels[compute] = fn
        return self._kernels

    def int8_one_row(self) -> Optional[Callable]:
        """The repacked one-row int8 kernel of this weight (backends.cpu), made on the first
        one-row int8 call: it holds a second copy of the weight, which only inference at
        M=1 with compute="int8" asks for."""
        if not _INT8_REPACK["on"] or self._one_call:  # a one-call weight would repack per call
            self._int8 = None
            return None
        gen, have = _INT8_REPACK["generation"], self._int8
        # A weight that had no such kernel on the path in force asks again on another one
        # (QLORA_KERNELS_ISA, _C.set_isa); a copy once made serves every path that has one.
        if have is None or have[0] != gen or (have[1] is None and have[2] != _cpu_path()):
            make = _backends.kernel_for("linear_4bit_int8_one_row", "cpu")[1]
            self._int8 = (gen, make(self.packed, self.absmax, self.blocksize, self.quant_type, self.out_features,
                                    self.in_features), _cpu_path())
        return self._int8[1]

    def has_int8_copy(self) -> bool:
        return self._int8 is not None and self._int8[1] is not None

    def _direct(self, x: torch.Tensor, bias: Optional[torch.Tensor], *more: torch.Tensor) -> Optional[dict]:
        """The cpu kernels (as ``kernels()``) when a call on ``x`` and ``bias`` (and the other
        tensors ``more``) may go straight to them, else None: another backend, autograd, a
        mode, torch.compile, other dtypes or layouts, a stale weight. The dispatcher's and
        custom op's wrappers and the op's checks are a sizeable part of a one-row call
        (docs/design.md, "Prepared weights"): what they would check, this weight was checked
        for when it was prepared, and the rest is checked here; a call that does not qualify
        takes the general path, whose checks name what is wrong."""
        if (not ops_linear.plain_call_ok(x, bias, *more) or x.dtype is not torch.float32
                or _backends.get_backend() != "cpu"):
            return None
        # plain_call_ok: not compiling. A weight made for this one call is current.
        if not self._one_call and not self.current(eager=True):
            return None  # the caller's general path prepares again
        if x.dim() < 1 or x.shape[-1] != self.in_features or not x.is_contiguous():
            return None
        if bias is not None and (bias.dtype is not torch.float32 or bias.shape != (self.out_features,)
                                 or not bias.is_contiguous()):
            return None
        return self.kernels()

    def forward_direct(self, x: torch.Tensor, bias: Optional[torch.Tensor], compute: str) -> Optional[torch.Tensor]:
        """``linear_4bit`` straight into the cpu kernel, or None when this call does not
        qualify (see ``_direct``)."""
        kernels = self._direct(x, bias)
        if kernels is None or compute not in kernels:
            return None
        if compute == "int8" and x.numel() == self.in_features:  # one row: the repacked kernel, where there is one
            one_row = self.int8_one_row()
            y = None if one_row is None else one_row(x, bias)
            if y is not None:
                return y
        return kernels[compute](x, bias)

    def lora_direct(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling,
                    bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``lora_linear_4bit`` without dropout straight into the cpu kernel (y alone: no
        backward will ask for u), or None when this call does not qualify (see ``_direct``;
        the adapter must also have the shapes the op's checks ask for)."""
        kernels = self._direct(x, bias, lora_A, lora_B)
        if kernels is None or "lora" not in kernels or type(scaling) is not float or not math.isfinite(scaling):
            return None
        if (lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.dtype not in FLOATS
                or lora_B.dtype not in FLOATS):
            return None
        r = lora_A.shape[0]
        if r < 1 or lora_A.shape[1] != self.in_features or lora_B.shape != (self.out_features, r):
            return None
        return kernels["lora"](x, *self.args(), lora_A, lora_B, scaling, bias, None, want_u=False)[0]


def prepare_4bit(packed: torch.Tensor, state: QuantState) -> Prepared4bit:
    """Check a 4-bit linear weight once and keep what its calls need (see Prepared4bit).
    ``linear_4bit(x, prepare_4bit(packed, state))`` then skips the per-call checks; the
    result is the same as ``linear_4bit(x, packed, state)``."""
    return Prepared4bit(packed, state)


def resolve(packed, state) -> Prepared4bit:
    """The prepared weight of a call given either ``(Prepared4bit, None)`` or
    ``(packed, state)`` (prepared for this call only)."""
    if isinstance(packed, Prepared4bit):
        if state is not None:
            raise TypeError("state must be None when packed is a prepared weight (prepare_4bit holds the state)")
        return packed.refreshed()
    w = Prepared4bit(packed, state)
    w._one_call = True
    return w

