// Design parameters of the HLS kernels: the one place they are set.
//
// qlora_kernels.fpga mirrors these values (src/qlora_kernels/fpga/params.py) to derive
// cycle counts and resources; tests/test_fpga_params.py parses this file and also reads
// the values compiled into qlora_kernels._hls, so the model cannot drift from the code.
// Only plain integer literals here: the Python side parses `#define QK_NAME <int>`.
#ifndef QK_HLS_PARAMS_H
#define QK_HLS_PARAMS_H

// ---- clock and memory ports -------------------------------------------------------------
#define QK_TARGET_CLOCK_MHZ 300   // the kernels are written for a 3.33 ns clock (Alveo default kernel clock)
#define QK_WORD_BITS 512          // every m_axi port is one 512-bit beat per cycle
#define QK_WORD_BYTES 64
#define QK_II 1                   // initiation interval of every streaming loop

// ---- 4-bit GEMV engine (qk_gemv_4bit) -----------------------------------------------------
#define QK_LANES 128              // 4-bit weights per beat = weights consumed per cycle
#define QK_BYTE_LANES 64          // pair-table lookups per cycle (one byte = two nibbles)
#define QK_CODES 16               // codebook entries
#define QK_PAIR_ENTRIES 256       // one pair table per byte lane: x[2b]*code[hi] + x[2b+1]*code[lo]
#define QK_GROUP_MIN 32           // smallest blocksize the engines scale by
#define QK_SCALE_SLOTS 4          // QK_LANES / QK_GROUP_MIN absmax multipliers per beat
#define QK_BUILD_MULS 4           // fp32 multipliers building the next tile's nibble products
#define QK_BUILD_ADDS 16          // fp32 adders building the next tile's pair tables
#define QK_BUILD_CYCLES 1536      // QK_LANES*QK_CODES/QK_BUILD_MULS + QK_BYTE_LANES*QK_PAIR_ENTRIES/QK_BUILD_ADDS
#define QK_GEMV_MAX_ROWS 8192     // on-chip accumulators (rows of W per call)
#define QK_GEMV_MAX_TILES 64      // on-chip x: 64 tiles of 128 columns = K up to 8192 per call
#define QK_PREFETCH_BEATS 1536    // weight FIFO: HBM keeps streaming while the first tile's tables build

// ---- bf16 mode of the GEMV engine (an unquantized lm_head), sharing its tables and tree --
#define QK_BF16_LANES 32          // bf16 weights per beat
#define QK_BF16_MANT 128          // mantissa table entries per lane: x * (1 + m/128)
#define QK_BF16_BUILD_CYCLES 1024 // QK_BF16_LANES*QK_BF16_MANT/QK_BUILD_MULS

// ---- 4-bit GEMM tile engines (qk_gemm_4bit forward, qk_gemm_4bit_t input gradient) -------
#define QK_GEMM_TM 16             // rows of X per pass: each weight beat is reused TM times, and
                                  // an accumulator is revisited every TM cycles (> fadd latency)
#define QK_GEMM_MAX_ROWS 4096     // on-chip accumulators / dy tile per call
#define QK_GEMM_MAX_TILES 64

// ---- decode unit (qk_decode_4bit) ---------------------------------------------------------
#define QK_DECODE_LANES 16        // fp32 outputs per cycle (one 512-bit output beat)

// ---- LoRA projections (qk_lora_down, qk_lora_up) ------------------------------------------
#define QK_LORA_LANES 64          // multiply-adds per cycle along K (down) / along r (up)
#define QK_LORA_MAX_R 64          // rank accumulators held on chip
#define QK_LORA_TM 16             // rows of x per pass

#endif  // QK_HLS_PARAMS_H
