"""Error messages shared by every backend, so that each backend rejects the same input
with the same words."""


def nonfinite_error(block: int, blocksize: int) -> ValueError:
    start = block * blocksize
    return ValueError(
        f"W contains NaN or Inf (first in block {block}, elements {start}..{start + blocksize - 1}); "
        "4-bit quantization needs finite weights: an infinite absmax would decode its whole block to NaN"
    )
