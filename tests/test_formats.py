"""The one definition of the formats, held against bitsandbytes' own constructors."""
import torch

import qlora_kernels as qk
from qlora_kernels import formats

from .conftest import bits


def test_codebooks_match_bitsandbytes_bit_for_bit(bnb):
    for qt in formats.QUANT_TYPES:
        ours = formats.codebook(qt)
        theirs = bnb.functional.get_4bit_type(qt, device="cpu")
        assert torch.equal(bits(ours), bits(theirs)), qt


def test_dynamic_map_matches_bitsandbytes(bnb):
    assert torch.equal(bits(formats.dynamic_map()), bits(bnb.functional.create_dynamic_map()))


def test_quant_tables_are_consistent():
    for qt in formats.QUANT_TYPES:
        code = formats.codebook(qt)
        bounds, order = formats.quant_tables(qt)
        assert bounds.shape == (15,) and order.shape == (16,)
        assert torch.all(bounds[1:] > bounds[:-1]), "bounds must be strictly ascending"
        assert sorted(order.tolist()) == list(range(16))
        sorted_code = code[order.long()]
        assert torch.all(sorted_code[1:] >= sorted_code[:-1])
        # every code value encodes to itself
        packed, state = qk.quantize_4bit(torch.cat([code, torch.ones(48)]), qt, 64)
        assert torch.equal(qk.dequantize_4bit(packed, state)[:16], code)


def test_even_element_sits_in_the_high_nibble():
    # -1.0 is nibble 0 and +1.0 nibble 15 in NF4: [-1, 1] packs to 0x0F, [1, -1] to 0xF0.
    for values, byte in (([-1.0, 1.0], 0x0F), ([1.0, -1.0], 0xF0)):
        packed, state = qk.quantize_4bit(torch.tensor(values), "nf4", 64)
        assert packed.shape == (1, 1) and packed.item() == byte


def test_odd_count_pads_low_nibble_with_code_of_zero():
    packed, _ = qk.quantize_4bit(torch.tensor([1.0]), "nf4", 64)
    assert packed.item() == (15 << 4) | 7  # 7 is NF4's exact zero
    packed, _ = qk.quantize_4bit(torch.tensor([1.0]), "fp4", 64)
    assert packed.item() == (3 << 4) | 0  # FP4: 1.0 is nibble 3, +0 is nibble 0


def test_layout_helpers():
    assert formats.packed_numel(7) == 4 and formats.num_blocks(4097, 64) == 65
    assert formats.BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
