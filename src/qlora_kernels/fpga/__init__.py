"""FPGA performance and resource model of the HLS kernels in ``hls/``.

``estimate(board="u280", model="phi-3-mini")`` says what a board would do: decode
tokens/s at batch 1 against the memory roofline, QLoRA training tokens/s, resource use,
and the bound that limits each, from the same design parameters the HLS code uses
(``hls/qk_hls_params.h``, mirrored in ``params.py`` and tested equal)."""
from .boards import BOARDS, Board, get_board
from .estimate import Estimate, Options, estimate, roofline_tokens_per_s, weight_bytes_per_token
from .llm import MODELS, PHI3_MINI, ModelConfig, from_hf_config, get_model
from .params import DESIGN, PARAMS, Design

__all__ = [
    "BOARDS", "Board", "DESIGN", "Design", "Estimate", "MODELS", "ModelConfig", "Options", "PARAMS", "PHI3_MINI",
    "estimate", "from_hf_config", "get_board", "get_model", "roofline_tokens_per_s", "weight_bytes_per_token",
]
