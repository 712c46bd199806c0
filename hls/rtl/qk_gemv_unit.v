// The 4-bit GEMV compute unit: y[n] = sum_k Wd[n, k] x[k] with W streamed one beat of LANES
// 4-bit codes per cycle (one row n, LANES consecutive columns of one tile) and x held on chip.
// Beats arrive tile-major, row-minor (tile 0 of rows 0..N-1, then tile 1, ...), as the HLS
// engine's device layout streams them (docs/fpga.md); columns past K are padding with x = 0.
//
// Per beat, with LANES lanes in SLOTS slots of GROUP lanes (one absmax per slot: the host
// repeats a block's absmax over the slots it spans, as the HLS scale layout does):
//   1. lane j: code[nibble j] * x[tile*LANES + j]           (codebook and x on chip; qk_fmul)
//   2. slot s: a balanced binary tree over its GROUP products: level 1 adds lanes (0,1),
//      (2,3), ..., level 2 adds those sums pairwise, ... (qk_fadd)
//   3. slot s: times its absmax, once per slot             (qk_fmul)
//   4. the SLOTS scaled sums by a balanced tree in slot order
//   5. y[n] += that, in tile order, in an accumulator RAM (tile 0 starts from +0).
// That is the summation order; every operation rounds to nearest even (exact IEEE fp32
// operators), so the result differs from the reference x @ Wd.T only by the rounding of a
// different order and of applying absmax after the sum: within (K + 2) * 2^-24 * |x| @ |Wd|^T
// plus the absmax rounding (tests/test_rtl.py checks the bound).
//
// One beat per cycle while in_valid. An accumulator is read LAT_ACC cycles before its sum
// is written back, so a row must not come back sooner: rows >= 8 (the HLS engine streams
// hundreds of rows per tile).
`include "qk_params.vh"
module qk_gemv_unit #(
    parameter LANES = `QK_LANES,
    parameter GROUP = `QK_GROUP_MIN,
    parameter MAX_TILES = `QK_GEMV_MAX_TILES,
    parameter MAX_ROWS = 1024
) (
    input  wire                     clk,
    input  wire                     rst,       // clears the row/tile counters
    input  wire                     cb_we,     // codebook write (16 entries, at run time)
    input  wire [3:0]               cb_addr,
    input  wire [31:0]              cb_data,
    input  wire                     x_we,      // x write: element x_addr (tile = addr / LANES)
    input  wire [31:0]              x_addr,
    input  wire [31:0]              x_data,
    input  wire [15:0]              rows,      // N, >= 8
    input  wire                     in_valid,
    input  wire [LANES*4-1:0]       in_codes,  // byte i = bits [8i+7:8i], element 2i in the high nibble
    input  wire [LANES/GROUP*32-1:0] in_scales,  // slot s = bits [32s+31:32s]
    /* verilator lint_off UNUSEDSIGNAL */  // the counters are wider than the RAMs' address
    input  wire [15:0]              rd_addr,   // accumulator read port (the result, after beats_done)
    /* verilator lint_on UNUSEDSIGNAL */
    output reg  [31:0]              rd_data,
    output wire [31:0]              beats_done // beats whose sum has been written back
);
  localparam SLOTS = LANES / GROUP;
  localparam LG = $clog2(GROUP);
  localparam LS = (SLOTS > 1) ? $clog2(SLOTS) : 0;
  localparam LAT_MUL = 8, LAT_ADD = 6;
  // cycles from a beat's input to its slot-sum-tree output (the accumulate stage's input)
  localparam LAT = 1 + LAT_MUL + LG * LAT_ADD + LAT_MUL + LS * LAT_ADD;

  // ---- row / tile counters of the incoming beats ------------------------------------------
  reg [15:0] row;
  reg [15:0] tile;
  always @(posedge clk) begin
    if (rst) begin
      row <= 16'd0;
      tile <= 16'd0;
    end else if (in_valid) begin
      if (row + 16'd1 == rows) begin
        row <= 16'd0;
        tile <= tile + 16'd1;
      end else begin
        row <= row + 16'd1;
      end
    end
  end

  // ---- stage 1: codebook and x lookups ------------------------------------------------------
  wire [LANES*32-1:0] code_v, x_v;
  genvar j;
  generate
    for (j = 0; j < LANES; j = j + 1) begin : lane
      reg [31:0] rom[0:15];
      reg [31:0] xb[0:MAX_TILES-1];  // this lane's x values, one per tile
      always @(posedge clk) begin
        if (cb_we) rom[cb_addr] <= cb_data;
        if (x_we && (x_addr % LANES) == j) xb[x_addr / LANES] <= x_data;
      end
      wire [3:0] nib = (j % 2 == 0) ? in_codes[8*(j/2)+7 -: 4] : in_codes[8*(j/2)+3 -: 4];
      reg [31:0] c_q, x_q;
      always @(posedge clk) begin
        c_q <= rom[nib];
        x_q <= xb[tile[$clog2(MAX_TILES)-1:0]];
      end
      assign code_v[32*j+31 -: 32] = c_q;
      assign x_v[32*j+31 -: 32] = x_q;
    end
  endgenerate

  // ---- stage 2: products ----------------------------------------------------------------------
  wire [LANES*32-1:0] prod;
  generate
    for (j = 0; j < LANES; j = j + 1) begin : mul
      qk_fmul m (.clk(clk), .en(1'b1), .a(code_v[32*j+31 -: 32]), .b(x_v[32*j+31 -: 32]), .p(prod[32*j+31 -: 32]));
    end
  endgenerate

  // the slot scales wait for their sums: 1 + LAT_MUL + LG * LAT_ADD cycles
  wire [SLOTS*32-1:0] scales_d;
  qk_delay #(.W(SLOTS * 32), .D(1 + LAT_MUL + LG * LAT_ADD)) dscale (.clk(clk), .d(in_scales), .q(scales_d));

  // ---- stage 3: per-slot trees, then the slot scale ---------------------------------------------
  wire [SLOTS*32-1:0] scaled;
  genvar s;
  generate
    for (s = 0; s < SLOTS; s = s + 1) begin : slot
      wire [32*GROUP-1:0] leaves = prod[32*GROUP*(s+1)-1 -: 32*GROUP];
      wire [31:0] sum;
      qk_fadd_tree #(.N(GROUP)) tree (.clk(clk), .in(leaves), .out(sum));
      qk_fmul m (.clk(clk), .en(1'b1), .a(sum), .b(scales_d[32*s+31 -: 32]), .p(scaled[32*s+31 -: 32]));
    end
  endgenerate

  // ---- stage 4: the slots' sum ------------------------------------------------------------------
  wire [31:0] beat_sum;
  generate
    if (SLOTS > 1) begin : slots
      qk_fadd_tree #(.N(SLOTS)) tree (.clk(clk), .in(scaled), .out(beat_sum));
    end else begin : one
      assign beat_sum = scaled;
    end
  endgenerate

  // the beat's row, first-tile flag and valid, delayed to the accumulate stage
  wire [15:0] row_d;
  wire first_d, valid_d;
  qk_delay #(.W(18), .D(LAT)) dmeta (.clk(clk), .d({row, tile == 16'd0, in_valid && !rst}),
                                     .q({row_d, first_d, valid_d}));

  // ---- stage 5: y[row] += beat_sum ------------------------------------------------------------------
  // read (1 cycle), add (LAT_ADD cycles), write back; the row and flags travel alongside
  reg [31:0] acc[0:MAX_ROWS-1];
  reg [31:0] old_q, sum_q;
  reg [15:0] row_q;
  reg        valid_q;
  always @(posedge clk) begin
    old_q <= first_d ? 32'd0 : acc[row_d[$clog2(MAX_ROWS)-1:0]];
    sum_q <= beat_sum;
    row_q <= row_d;
    valid_q <= valid_d;
  end
  wire [31:0] new_acc;
  qk_fadd add (.clk(clk), .en(1'b1), .a(old_q), .b(sum_q), .s(new_acc));
  /* verilator lint_off UNUSEDSIGNAL */
  wire [15:0] row_w;
  /* verilator lint_on UNUSEDSIGNAL */
  wire valid_w;
  qk_delay #(.W(17), .D(LAT_ADD)) dw (.clk(clk), .d({row_q, valid_q}), .q({row_w, valid_w}));
  reg [31:0] done;
  always @(posedge clk) begin
    if (valid_w) acc[row_w[$clog2(MAX_ROWS)-1:0]] <= new_acc;
    if (rst) done <= 32'd0;
    else if (valid_w) done <= done + 32'd1;
    rd_data <= acc[rd_addr[$clog2(MAX_ROWS)-1:0]];
  end
  assign beats_done = done;
endmodule
