// IEEE-754 binary32 add, round to nearest even, subnormal inputs and outputs (no flush to
// zero): for every pair of inputs the same bits as an x86 CPU's fp32 add (SSE/AVX, default
// MXCSR). NaNs as x86: the first NaN operand quieted, inf + -inf gives 0xFFC00000. An exact
// zero from x + (-x) is +0; -0 + -0 is -0. The building block of the GEMV unit's adder tree.
//
// Six pipeline stages (latency 6, one result per cycle while en is high):
//   1. unpack, special cases; order the operands so that |x| >= |y|;
//   2. align y's significand to x's exponent (right shift; 3 extra bits: guard, round and a
//      sticky bit that ORs everything shifted further out);
//   3. add or subtract the significands (never negative: |x| >= |y|);
//   4. leading-zero count of the 28-bit result;
//   5. normalise: one right shift after a carry, or a left shift by the leading zeros but
//      not below exponent 1 (a result that small stays subnormal);
//   6. round to nearest even and pack as ((E - 1) << 23) + significand (as qk_fmul).
module qk_fadd (
    input  wire        clk,
    input  wire        en,
    input  wire [31:0] a,
    input  wire [31:0] b,
    output wire [31:0] s
);
  // ---- stage 1 --------------------------------------------------------------------------
  wire [7:0] ea = a[30:23], eb = b[30:23];
  wire a_nan = (ea == 8'hFF) && (a[22:0] != 23'd0), b_nan = (eb == 8'hFF) && (b[22:0] != 23'd0);
  wire a_inf = (ea == 8'hFF) && (a[22:0] == 23'd0), b_inf = (eb == 8'hFF) && (b[22:0] == 23'd0);
  reg [31:0] special;
  reg        is_special;
  always @(*) begin
    is_special = 1'b1;
    if (a_nan) special = {a[31:23], 1'b1, a[21:0]};
    else if (b_nan) special = {b[31:23], 1'b1, b[21:0]};
    else if (a_inf && b_inf && (a[31] != b[31])) special = 32'hFFC00000;
    else if (a_inf) special = a;
    else if (b_inf) special = b;
    else begin
      special = 32'd0;
      is_special = 1'b0;
    end
  end
  wire swap = b[30:0] > a[30:0];
  wire [31:0] x = swap ? b : a, y = swap ? a : b;
  reg        s1_sp, s1_sx, s1_sub, s1_both_neg_zero;
  reg [31:0] s1_special;
  reg [7:0]  s1_ex, s1_shift;
  reg [23:0] s1_mx, s1_my;
  always @(posedge clk)
    if (en) begin
      s1_sp <= is_special;
      s1_special <= special;
      s1_sx <= x[31];
      s1_sub <= x[31] ^ y[31];
      s1_both_neg_zero <= (a[30:0] == 31'd0) && (b[30:0] == 31'd0) && a[31] && b[31];
      // a subnormal's exponent counts as 1 (its hidden bit is 0)
      s1_ex <= (x[30:23] == 8'd0) ? 8'd1 : x[30:23];
      s1_shift <= ((x[30:23] == 8'd0) ? 8'd1 : x[30:23]) - ((y[30:23] == 8'd0) ? 8'd1 : y[30:23]);
      s1_mx <= {x[30:23] != 8'd0, x[22:0]};
      s1_my <= {y[30:23] != 8'd0, y[22:0]};
    end

  // ---- stage 2: align ---------------------------------------------------------------------
  wire [4:0]  sh = (s1_shift > 8'd27) ? 5'd27 : s1_shift[4:0];
  wire [53:0] aligned = {s1_my, 3'b000, 27'd0} >> sh;  // [53:27]: significand + GR, below: out
  reg        s2_sp, s2_sx, s2_sub, s2_bnz;
  reg [31:0] s2_special;
  reg [7:0]  s2_ex;
  reg [26:0] s2_mx, s2_my;  // 24 bits + guard, round, sticky
  always @(posedge clk)
    if (en) begin
      s2_mx <= {s1_mx, 3'b000};
      s2_my <= {aligned[53:28], aligned[27] | (|aligned[26:0])};
      s2_ex <= s1_ex;
      s2_sx <= s1_sx;
      s2_sub <= s1_sub;
      s2_bnz <= s1_both_neg_zero;
      s2_sp <= s1_sp;
      s2_special <= s1_special;
    end

  // ---- stage 3: add or subtract -----------------------------------------------------------
  reg [27:0] s3_sum;
  reg        s3_sp, s3_sx, s3_bnz;
  reg [31:0] s3_special;
  reg [7:0]  s3_ex;
  always @(posedge clk)
    if (en) begin
      s3_sum <= s2_sub ? {1'b0, s2_mx} - {1'b0, s2_my} : {1'b0, s2_mx} + {1'b0, s2_my};
      s3_ex <= s2_ex;
      s3_sx <= s2_sx;
      s3_bnz <= s2_bnz;
      s3_sp <= s2_sp;
      s3_special <= s2_special;
    end

  // ---- stage 4: leading zeros of the 27 bits below the carry ------------------------------
  function [4:0] lz27(input [26:0] v);  // 27 when v == 0
    reg [31:0] t;
    begin
      t = {v, 5'b11111};
      lz27[4] = (t[31:16] == 16'd0);
      if (lz27[4]) t = {t[15:0], 16'd0};
      lz27[3] = (t[31:24] == 8'd0);
      if (lz27[3]) t = {t[23:0], 8'd0};
      lz27[2] = (t[31:28] == 4'd0);
      if (lz27[2]) t = {t[27:0], 4'd0};
      lz27[1] = (t[31:30] == 2'd0);
      if (lz27[1]) t = {t[29:0], 2'd0};
      lz27[0] = !t[31];
    end
  endfunction
  reg [27:0] s4_sum;
  reg [4:0]  s4_lz;
  reg        s4_sp, s4_sx, s4_bnz;
  reg [31:0] s4_special;
  reg [7:0]  s4_ex;
  always @(posedge clk)
    if (en) begin
      s4_sum <= s3_sum;
      s4_lz <= lz27(s3_sum[26:0]);
      s4_ex <= s3_ex;
      s4_sx <= s3_sx;
      s4_bnz <= s3_bnz;
      s4_sp <= s3_sp;
      s4_special <= s3_special;
    end

  // ---- stage 5: normalise -------------------------------------------------------------------
  // After a carry: shift right by one (the lost bit joins the sticky bit), exponent + 1.
  // Otherwise shift left by the leading zeros, but at most to exponent 1 (subnormal).
  wire [7:0]  room = s4_ex - 8'd1;  // left shifts that keep the exponent >= 1
  wire [4:0]  lsh = ({3'd0, s4_lz} > room) ? room[4:0] : s4_lz;
  wire [26:0] left = s4_sum[26:0] << lsh;
  reg [26:0] s5_m;  // 24 bits + guard, round, sticky
  reg [8:0]  s5_e;  // biased exponent of the result (0 when subnormal), may reach 255
  reg        s5_zero, s5_sp, s5_sx, s5_bnz;
  reg [31:0] s5_special;
  always @(posedge clk)
    if (en) begin
      if (s4_sum[27]) begin
        s5_m <= {s4_sum[27:2], s4_sum[1] | s4_sum[0]};
        s5_e <= {1'b0, s4_ex} + 9'd1;
      end else begin
        s5_m <= left;
        // still no leading 1 after the shift: a subnormal (or zero) result, exponent field 0
        s5_e <= left[26] ? {1'b0, s4_ex} - {4'd0, lsh} : 9'd0;
      end
      s5_zero <= (s4_sum == 28'd0);
      s5_sx <= s4_sx;
      s5_bnz <= s4_bnz;
      s5_sp <= s4_sp;
      s5_special <= s4_special;
    end

  // ---- stage 6: round to nearest even, pack -------------------------------------------------
  wire [23:0] sig = s5_m[26:3];
  wire        round_up = s5_m[2] & (s5_m[1] | s5_m[0] | sig[0]);
  // (E - 1) << 23 plus the significand with its hidden bit; E = 0 (subnormal) packs the
  // significand alone, whose hidden bit is then 0
  wire [31:0] pk = ((s5_e == 9'd0) ? 32'd0 : {s5_e - 9'd1, 23'd0}) + {8'd0, sig} + {31'd0, round_up};
  wire        over = pk[31] || (pk[30:23] == 8'hFF);
  wire [31:0] fin = over ? {s5_sx, 8'hFF, 23'd0} : {s5_sx, pk[30:0]};
  reg [31:0] s6_s;
  always @(posedge clk)
    if (en) s6_s <= s5_sp ? s5_special : (s5_zero ? {s5_bnz, 31'd0} : fin);
  assign s = s6_s;
endmodule
