// Generated from hls/qk_hls_params.h by qlora_kernels.fpga.rtl.params_vh(): do not edit.
`ifndef QK_PARAMS_VH
`define QK_PARAMS_VH
`define QK_TARGET_CLOCK_MHZ 300
`define QK_WORD_BITS 512
`define QK_WORD_BYTES 64
`define QK_II 1
`define QK_LANES 128
`define QK_BYTE_LANES 64
`define QK_CODES 16
`define QK_PAIR_ENTRIES 256
`define QK_GROUP_MIN 32
`define QK_SCALE_SLOTS 4
`define QK_BUILD_MULS 4
`define QK_BUILD_ADDS 16
`define QK_BUILD_CYCLES 1536
`define QK_GEMV_MAX_ROWS 8192
`define QK_GEMV_MAX_TILES 64
`define QK_PREFETCH_BEATS 1536
`define QK_BF16_LANES 32
`define QK_BF16_MANT 128
`define QK_BF16_BUILD_CYCLES 1024
`define QK_GEMM_TM 16
`define QK_GEMM_MAX_ROWS 4096
`define QK_GEMM_MAX_TILES 64
`define QK_DECODE_LANES 16
`define QK_LORA_LANES 64
`define QK_LORA_MAX_R 64
`define QK_LORA_TM 16
`endif
