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
NESTED_BLOCKSIZE = 256
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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
def _codebook_cpu(quant_type: str) -> torch.Tensor:
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
    return _codebook_cpu(quant_type).clone()


@functools.cache
def _int8_codebook_cpu(quant_type: str) -> torch.Tensor:
    return torch.round(_codebook_cpu(quant_type) * 127).to(torch.int8)


def int8_codebook(quant_type: str) -> torch.Tensor:
    """The codebook of the int8-compute linear (``linear_4bit(..., compute="int8")``):
    ``rint(code * 127)`` as int8, indexed by nibble (both codebooks span [-1, 1]). A
    fresh copy each call."""
    return _int8_codebook_cpu(quant_type).clone()


@functools.cache
def _quant_tables_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _codebook_cpu(quant_type)
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pack_dict(d: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    try:
        return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state: the packed quant_state tensor is not valid JSON ({e})") from None


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
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of ``as_dict``; accepts packed or unpacked dicts, with or without a
        module prefix on the keys (``"...weight.absmax"``)."""
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
            qs_dict.update(_unpack_dict(qs_dict.pop(key)))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - _VALID_KEYS
        if unknown:
            raise ValueError(f"quant_state: unexpected keys {sorted(unknown)}")
        for k in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if k not in qs_dict:
                raise ValueError(f"quant_state: missing key {k!r}")
        if qs_dict["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_state: quant_type must be one of {QUANT_TYPES}, got {qs_dict['quant_type']!r}")
        state2 = offset = None
        if "nested_absmax" in qs_dict:
            offset = torch.tensor(float(qs_dict["nested_offset"]), device=device)
            state2 = cls(
                absmax=qs_dict["nested_absmax"].to(device),
                blocksize=int(qs_dict["nested_blocksize"]),
                code=qs_dict["nested_quant_map"].to(device),
                dtype=getattr(torch, qs_dict["nested_dtype"]),
            )
        shape = qs_dict["shape"]
        return cls(
            absmax=qs_dict["absmax"].to(device),
            shape=torch.Size(shape) if shape is not None else None,
            code=qs_dict["quant_map"].to(device),
            blocksize=int(qs_dict["blocksize"]),
            quant_type=qs_dict["quant_type"],
            dtype=getattr(torch, qs_dict["dtype"]),
            offset=offset,
            state2=state2,
        )

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
