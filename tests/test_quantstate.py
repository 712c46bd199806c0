"""QuantState serialization interoperates with bitsandbytes' in both directions."""
import re

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import QuantState

from .conftest import assert_equals_bnb_dequant, bits


def _same_state(ours: QuantState, theirs) -> None:
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert ours.blocksize == theirs.blocksize and ours.quant_type == theirs.quant_type
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours.absmax, theirs.absmax)
    assert torch.equal(bits(ours.code), bits(theirs.code))
    assert ours.nested == theirs.nested
    if ours.nested:
        assert float(ours.offset) == float(theirs.offset)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax)
        assert torch.equal(bits(ours.state2.code), bits(theirs.state2.code))
        assert ours.state2.blocksize == theirs.state2.blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("packed", [True, False])
def test_roundtrip_with_bitsandbytes(bnb, quant_type, double_quant, dtype, packed):
    W = torch.randn(48, 128).to(dtype)  # rows of whole blocks: see test_bnb_native_dequant_defect_is_real
    q, ours = qk.quantize_4bit(W, quant_type, 64, double_quant)
    d = ours.as_dict(packed=packed)
    if packed:
        assert all(isinstance(v, torch.Tensor) for v in d.values())
        assert f"quant_state.bitsandbytes__{quant_type}" in d
        assert {"absmax", "quant_map"} <= set(d)
        assert ({"nested_absmax", "nested_quant_map"} <= set(d)) == double_quant
    theirs = bnb.functional.QuantState.from_dict(dict(d), device=torch.device("cpu"))
    _same_state(ours, theirs)
    # bitsandbytes decodes our bytes with our state exactly as we do (its torch path, and
    # its native one where that has no documented defect)
    assert_equals_bnb_dequant(bnb, qk.dequantize_4bit(q, ours, dtype=None), q, theirs)
    # and the reverse direction: a state written by bitsandbytes loads here
    qb, sb = bnb.functional.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    back = QuantState.from_dict(sb.as_dict(packed=packed))
    _same_state(back, sb)
    assert back == QuantState.from_dict(back.as_dict(packed=True))


def test_from_dict_accepts_module_prefixes():
    _, st = qk.quantize_4bit(torch.randn(8, 64), double_quant=True)
    prefixed = {f"model.layers.0.q_proj.weight.{k}": v for k, v in st.as_dict(packed=True).items()}
    assert QuantState.from_dict(prefixed) == st


def test_from_dict_errors_name_the_key():
    _, st = qk.quantize_4bit(torch.randn(8, 64))
    d = st.as_dict(packed=True)
    with pytest.raises(ValueError, match="quant_state"):
        QuantState.from_dict({"absmax": d["absmax"]})
    bad = dict(d)
    bad["quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0xFE], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantState.from_dict(bad)
    extra = dict(d, surprise=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected keys"):
        QuantState.from_dict(extra)
    missing = {k: v for k, v in d.items() if k != "absmax"}
    with pytest.raises(ValueError, match="absmax"):
        QuantState.from_dict(missing)
    # JSON that json.loads takes but a state cannot hold: named ValueErrors, not OverflowError
    # or TypeError from deep inside (they escaped load_state_dict's error list)
    packed_json = bytes(d["quant_state.bitsandbytes__nf4"].tolist()).decode()
    infinite = re.sub(r'"blocksize": *\d+', '"blocksize": Infinity', packed_json)
    assert infinite != packed_json
    for text, match in (('[1]', "JSON list, not an object"), (infinite, "blocksize must be an integer")):
        odd = dict(d)
        odd["quant_state.bitsandbytes__nf4"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
        with pytest.raises(ValueError, match=match):
            QuantState.from_dict(odd)
    # an nf4 state under the fp4 key: it loaded as nf4 (the JSON won) with nothing said
    swapped = dict(d)
    swapped["quant_state.bitsandbytes__fp4"] = swapped.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="must name the same quant type"):
        QuantState.from_dict(swapped)


def test_a_float_blocksize_and_a_missing_dtype_are_named():
    # 64.0 passed validation and failed in the kernels' argument parsing; dtype None (a state
    # made without one) reached the dispatcher's "Expected a value of type 'int'"
    import dataclasses

    import qlora_kernels as qk

    packed, state = qk.quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="state.blocksize must be one of"):
        dataclasses.replace(state, blocksize=64.0).validate()
    with pytest.raises(TypeError, match=r"none given, and state.dtype is None"):
        qk.dequantize_4bit(packed, dataclasses.replace(state, dtype=None), dtype=None)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        qk.dequantize_4bit(packed, state, dtype="float32")


@pytest.mark.parametrize("packed", [False, True])
def test_a_state_without_dtype_round_trips(packed):
    """dtype=None passes validate() and dequantizes, but was written as "None", a dict that
    from_dict then refused. It is written as null and read back as None; refusing it when
    written broke state_dict() (PEFT's adapter-only save among its callers)."""
    import dataclasses

    _, st = qk.quantize_4bit(torch.randn(8, 64), double_quant=True)
    for s in (dataclasses.replace(st, dtype=None), dataclasses.replace(st, state2=dataclasses.replace(st.state2, dtype=None))):
        back = QuantState.from_dict(s.as_dict(packed=packed))
        assert back.dtype == s.dtype and back.state2.dtype == s.state2.dtype
        assert torch.equal(back.absmax, s.absmax) and torch.equal(back.state2.absmax, s.state2.absmax)
    assert QuantState.from_dict(st.as_dict(packed=packed)) == st
