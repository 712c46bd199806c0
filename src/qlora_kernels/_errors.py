"""Error messages shared by every backend, so that each backend rejects the same input
with the same words; and the commands' one-line error report."""
import sys
from typing import Callable


class NonFiniteError(ValueError):
    """Quantization met NaN or Inf (a ValueError: bad input). Its own class so that a caller
    with other semantics for it (the bitsandbytes plugin hands such weights to bitsandbytes)
    needs no message matching."""


def nonfinite_error(block: int, blocksize: int) -> NonFiniteError:
    start = block * blocksize
    return NonFiniteError(
        f"W contains NaN or Inf (first in block {block}, elements {start}..{start + blocksize - 1}); "
        "4-bit quantization needs finite weights: an infinite absmax would decode its whole block to NaN"
    )


def one_line_errors(command: str, run: Callable, args, expected: tuple) -> int:
    """``run(args)``, with an ``expected`` error (bad input the command explains) reported
    as one line on stderr and exit status 2; ``--debug`` shows the traceback instead."""
    try:
        return run(args)
    except expected as e:
        if args.debug:
            raise
        print(f"qlora-kernels {command}: error: {e}", file=sys.stderr)
        return 2
