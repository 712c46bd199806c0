"""NF4/FP4 formats, the one definition.

Everything else (the C++ kernels, the OpenCL and HLS copies, the reference backend) takes
its codebooks and block layout from here, or is tested byte-for-byte against it.

Layout (bitsandbytes 0.50, ``quant_storage=uint8``):

* the weight is flattened row-major; element ``i`` belongs to block ``i // blocksize`` and
  is scaled by ``absmax[i // blocksize]``, the block's largest ``|x|`` in fp32;
* element ``i`` is stored in byte ``i // 2``: **even ``i`` in the high nibble**, odd ``i``
  in the low nibble; an odd element count pads the last low nibble with the code of 0.0;
* the packed tensor has shape ``[(n + 1) // 2, 1]`` (as ``Params4bit`` stores it);
* a nibble indexes a 16-entry codebook; quantization scales by the absmax, clamps to
  [-1, 1] and picks the bucket among the midpoints of the sorted codebook, ties to the
  lower bucket (``torch.bucketize``), then maps sorted bucket -> code index;
* double quantization ("compress_statistics"): ``absmax - absmax.mean()`` is quantized
  8-bit blockwise (blocksize 256) with the signed dynamic map.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
# bitsandbytes' absmax clamp when quantizing: an all-zero block encodes as the code of 0.0
# (its scale 1/absmax stays finite). Every backend's quantizer uses this one value.
ABSMAX_FLOOR = 1e-38
NESTED_BLOCKSIZE = 256
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The activation dtype as the native kernels take it (csrc/convert.h, kernels/common.cl).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]

# QLoRA (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero. These are bitsandbytes' values, as Python floats rounded to fp32.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) listed by bit pattern, normalised by
# its largest magnitude (12) in fp32, exactly as bitsandbytes builds it. Nibble 8 (sign
# bit, zero magnitude) decodes to +0.0, not -0.0: bitsandbytes writes it as the integer
# -0, and its outputs carry +0.0 bits there.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)  # fmt: skip


@functools.cache
def codebook_cpu(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values, one shared CPU tensor per type (read it, never write it;
    ``codebook`` gives a copy)."""
    # device="cpu" explicitly: a first call under `with torch.device("meta")` (as
    # from_pretrained runs) must not cache meta tensors for the rest of the process.
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32, device="cpu")
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32, device="cpu")
        return raw / raw.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 fp32 code values, indexed by nibble. A fresh copy each call."""
    return codebook_cpu(quant_type).clone()


@functools.cache
def int8_codebook_cpu(quant_type: str) -> torch.Tensor:
    """``int8_codebook`` as one shared CPU tensor per type (read it, never write it)."""
    return torch.round(codebook_cpu(quant_type) * 127).to(torch.int8)


def int8_codebook(quant_type: str) -> torch.Tensor:
    """The codebook of the int8-compute linear (``linear_4bit(..., compute="int8")``):
    ``rint(code * 127)`` as int8, indexed by nibble (both codebooks span [-1, 1]). A
    fresh copy each call."""
    return int8_codebook_cpu(quant_type).clone()


@functools.cache
def _quant_tables_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = codebook_cpu(quant_type)
    # Stable sort: FP4 has +0 (nibble 0) and -0 (nibble 8); the stable order puts nibble
    # 0 first, which is the choice bitsandbytes' argsort makes (tested against it).
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds.contiguous(), order.to(torch.uint8).contiguous()


def quant_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bounds[15] fp32 ascending, order[16] uint8): bucket of a scaled value is the
    count of bounds strictly below it; ``order[bucket]`` is the nibble."""
    b, o = _quant_tables_cpu(quant_type)
    return b.clone(), o.clone()


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561) with 7
    exponent bits: for each decade 10^(i-6), i = 0..6, the 2^i midpoints of
    linspace(0.1, 1, 2^i + 1), both signs, plus 0 and 1; sorted."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32, device="cpu")
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + i)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    assert len(values) == 256
    return torch.tensor(values, dtype=torch.float32, device="cpu")


def dynamic_map() -> torch.Tensor:
    return _dynamic_map_cpu().clone()


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def packed_numel(n: int) -> int:
    return (n + 1) // 2


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    # None (a state built without it: validate() and the kernels take it) is written as JSON
    # null and read back as None; it was written as "None", which from_dict refused
    return None if dtype is None else str(dtype).removeprefix("torch.")


_DTYPES_BY_NAME = {_dtype_name(d): d for d in INPUT_DTYPES}


def _dtype_from_name(name: Any, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"quant_state: {key} must be one of {sorted(_DTYPES_BY_NAME)}, got {name!r}")
    return _DTYPES_BY_NAME[name]


def _int_item(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"quant_state: {key} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (ValueError, OverflowError):  # "x", or an Infinity/NaN that json.loads accepts
        raise ValueError(f"quant_state: {key} must be an integer, got {value!r}") from None
    if float(value) != out:
        raise ValueError(f"quant_state: {key} must be an integer, got {value!r}")
    return out


def _pack_dict(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    try:
        d = json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state: the packed quant_state tensor is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"quant_state: the packed quant_state tensor holds a JSON {type(d).__name__}, not an object")
    return d


_QS_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = {
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
    "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
}  # fmt: skip


@dataclass(eq=False)
class QuantState:
    """Everything needed to decode a packed 4-bit tensor; attribute names and the
    serialized form (``as_dict``/``from_dict``) follow ``bitsandbytes.functional.QuantState``,
    so a state written by either library loads in the other.

    With double quantization (``nested``), ``absmax`` holds the uint8 codes of
    ``absmax - offset`` and ``state2`` holds their blockwise scales and the dynamic map.
    """

    absmax: torch.Tensor
    shape: Optional[torch.Size] = None
    code: Optional[torch.Tensor] = None
    blocksize: Optional[int] = None
    quant_type: Optional[str] = None
    dtype: Optional[torch.dtype] = None
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' keys. ``packed=True`` gives only tensors (for safetensors): the
        non-tensor items go, as UTF-8 JSON bytes, under ``quant_state.bitsandbytes__<type>``."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed or self.quant_type is None:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        tensors[_QS_PREFIX + self.quant_type] = _pack_dict({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)})
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu",
                  validate: bool = True) -> "QuantState":
        """Inverse of ``as_dict``; accepts packed or unpacked dicts, with or without a
        module prefix on the keys (``"...weight.absmax"``). The state is validated
        (``validate()``) unless the caller checks it against its layer first and validates
        after, to name the offending checkpoint key (the transformers loader does)."""
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict and len(packed_keys) != 1:
            raise ValueError(
                f"quant_state: expected exactly one packed '{_QS_PREFIX}nf4|fp4' tensor or unpacked items, found {packed_keys}"
            )
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if suffix not in ("bitsandbytes__nf4", "bitsandbytes__fp4"):
                raise ValueError(f"quant_state: unknown packed key {key!r}")
            unpacked = _unpack_dict(qs_dict.pop(key))
            # The key names the quant type too (bitsandbytes writes both from one value); a
            # checkpoint whose two disagree was edited or mixed up, and either reading is a guess.
            if unpacked.get("quant_type", suffix[len("bitsandbytes__"):]) != suffix[len("bitsandbytes__"):]:
                raise ValueError(f"quant_state: {key!r} holds quant_type {unpacked.get('quant_type')!r}; the key "
                                 f"and the value must name the same quant type")
            qs_dict.update(unpacked)
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - _VALID_KEYS
        if unknown:
            raise ValueError(f"quant_state: unexpected keys {sorted(unknown)}")
        for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if k not in qs_dict:
                raise ValueError(f"quant_state: missing key {k!r}")
        if qs_dict["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_state: quant_type must be one of {QUANT_TYPES}, got {qs_dict['quant_type']!r}")
        def load(k: str) -> torch.Tensor:
            t = qs_dict[k]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"quant_state: {k} must be a tensor, got {type(t).__name__}")
            if t.device.type == "meta" and torch.device(device).type != "meta":
                raise ValueError(f"quant_state: {k} is a meta tensor (it has no data to load onto {device})")
            return t.to(device)

        state2 = offset = None
        nested_keys = {"nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset"}
        if nested_keys & set(qs_dict):
            missing = sorted(nested_keys - set(qs_dict))
            if missing:
                raise ValueError(f"quant_state: a double-quantized state needs {missing} too")
            try:
                offset = torch.tensor(float(qs_dict["nested_offset"]), device=device)
            except (TypeError, ValueError):
                raise ValueError(f"quant_state: nested_offset must be a number, got {qs_dict['nested_offset']!r}") from None
            state2 = cls(
                absmax=load("nested_absmax"),
                blocksize=_int_item(qs_dict["nested_blocksize"], "nested_blocksize"),
                code=load("nested_quant_map"),
                dtype=_dtype_from_name(qs_dict["nested_dtype"], "nested_dtype"),
            )
        shape = qs_dict["shape"]
        if shape is None or isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise ValueError(f"quant_state: shape must be a list of sizes, got {shape!r}")
        state = cls(
            absmax=load("absmax"),
            shape=torch.Size([_int_item(v, "shape") for v in shape]),
            code=load("quant_map"),
            blocksize=_int_item(qs_dict["blocksize"], "blocksize"),
            quant_type=qs_dict["quant_type"],
            dtype=_dtype_from_name(qs_dict["dtype"], "dtype"),
            offset=offset,
            state2=state2,
        )
        if validate:
            try:
                state.validate()
            except (TypeError, ValueError) as e:
                raise ValueError(f"quant_state: {e}") from None
        return state

    def validate(self) -> None:
        """Checks the whole state before anything reads it: a state decoded from outside
        (a checkpoint, ``from_dict``, attributes set by hand) must never lead a kernel past
        a buffer. Sizes follow from ``shape`` and the blocksizes; the nested (double
        quantization) map must have its 256 entries. The codebook's values are checked
        where it is used (``functional``). Messages name the attribute (``state.X``) and,
        where it differs, the serialized key."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"state.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        # an int: 64.0 is "in" BLOCKSIZES and then failed in the kernels' argument parsing
        if type(self.blocksize) is not int or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"state.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.shape is None:
            raise ValueError("state.shape is missing")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.shape):
            raise ValueError(f"state.shape must hold non-negative ints, got {tuple(self.shape)}")
        if self.dtype is not None and self.dtype not in INPUT_DTYPES:
            raise ValueError(f"state.dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if not isinstance(self.code, torch.Tensor) or self.code.numel() != 16 or not self.code.is_floating_point():
            raise ValueError(f"state.code (quant_map) is not the {self.quant_type} codebook: it needs 16 float entries")
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError(f"state.absmax must be a tensor, got {type(self.absmax).__name__}")
        if not self.nested and self.absmax.dtype != torch.float32:
            raise TypeError(f"state.absmax must be float32, got {self.absmax.dtype}")
        if self.nested and self.absmax.dtype != torch.uint8:
            raise TypeError(f"state.absmax must hold uint8 codes for a double-quantized state, got {self.absmax.dtype}")
        blocks = num_blocks(self.numel, self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(f"state.absmax has {self.absmax.numel()} entries but shape {tuple(self.shape)} with "
                             f"blocksize {self.blocksize} needs {blocks}")
        if not self.nested:
            return
        s2 = self.state2
        # an empty weight's offset is the mean of no values (NaN, as bitsandbytes has it)
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or (
                blocks and not torch.compiler.is_compiling() and not bool(torch.isfinite(self.offset.float()).all())):
            raise ValueError(f"state.offset (nested_offset) must be one finite number, got {self.offset!r}")
        if not isinstance(s2, QuantState):
            raise TypeError(f"state.state2 must be a QuantState, got {type(s2).__name__}")
        if isinstance(s2.blocksize, bool) or not isinstance(s2.blocksize, int) or s2.blocksize < 1:
            raise ValueError(f"state.state2.blocksize (nested_blocksize) must be a positive int, got {s2.blocksize!r}")
        if not isinstance(s2.code, torch.Tensor) or s2.code.numel() != 256 or s2.code.dtype != torch.float32:
            got = f"{s2.code.numel()} {s2.code.dtype}" if isinstance(s2.code, torch.Tensor) else type(s2.code).__name__
            raise ValueError(f"state.state2.code (nested_quant_map) must be the 256-entry float32 8-bit map, got {got}")
        if not isinstance(s2.absmax, torch.Tensor) or s2.absmax.dtype != torch.float32:
            raise TypeError("state.state2.absmax (nested_absmax) must be a float32 tensor")
        if s2.absmax.numel() != num_blocks(blocks, s2.blocksize):
            raise ValueError(f"state.state2.absmax (nested_absmax) has {s2.absmax.numel()} entries but {blocks} codes "
                             f"with blocksize {s2.blocksize} need {num_blocks(blocks, s2.blocksize)}")

    def to(self, device) -> "QuantState":
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same = (
            self.shape == other.shape
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.dtype == other.dtype
            and torch.equal(self.absmax, other.absmax)
            and torch.equal(self.code, other.code)
            and self.nested == other.nested
        )
        if same and self.nested:
            same = torch.equal(self.offset.float(), other.offset.float()) and self.state2 == other.state2
        return same
