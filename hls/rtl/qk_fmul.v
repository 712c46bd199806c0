// IEEE-754 binary32 multiply, round to nearest even, subnormal inputs and outputs (no
// flush to zero): for every pair of inputs the same bits as an x86 CPU's fp32 multiply
// (SSE/AVX, default MXCSR), which is what the reference backend computes. That includes
// NaNs: the first NaN operand is returned quieted, inf * 0 gives the x86 default NaN
// 0xFFC00000.
//
// Eight pipeline stages (latency 8, one result per cycle while en is high), each a short
// path: the first version did all of this in three stages and placed at 16 MHz on an ECP5
// (a leading-zero count written as a chain of 24 incrementers was the critical path), a
// six-stage one at 50 MHz (normalise + 96-bit shift + sticky in one stage), and this one
// at 81 MHz before the exponent arithmetic moved beside the product (stage 3).
//   1. unpack and special cases; normalise each significand to a leading 1 by a 5-level
//      shift cascade (16, 8, 4, 2, 1) that yields the shift count bit by bit;
//   2. two 24 x 12 partial products (DSP blocks), the exponent sum;
//   3. the 48-bit product from the partial products; beside it, the exponent, subnormal
//      shift and overflow for either place of the product's leading 1;
//   4. normalise to a leading 1 in bit 47 and select the matching exponent information;
//   5-6. that shift, by multiples of 8 then by 0..7 (the shifted-out bits become the
//      sticky bit);
//   7. round to nearest even and pack as ((E - 1) << 23) + significand: a rounding carry
//      moves into the exponent by itself, a subnormal rounding up to 2^-126 becomes the
//      smallest normal, and a carry out of the largest exponent gives exactly +-inf;
//   8. the special-case select.
module qk_fmul (
    input  wire        clk,
    input  wire        en,
    input  wire [31:0] a,
    input  wire [31:0] b,
    output wire [31:0] p
);
  // ---- stage 1: unpack, special cases, normalise significands -----------------------------
  wire       sa = a[31], sb = b[31];
  wire [7:0] ea = a[30:23], eb = b[30:23];
  wire [22:0] fa = a[22:0], fb = b[22:0];
  wire a_nan = (ea == 8'hFF) && (fa != 23'd0), b_nan = (eb == 8'hFF) && (fb != 23'd0);
  wire a_inf = (ea == 8'hFF) && (fa == 23'd0), b_inf = (eb == 8'hFF) && (fb == 23'd0);
  wire a_zero = (ea == 8'd0) && (fa == 23'd0), b_zero = (eb == 8'd0) && (fb == 23'd0);
  wire sign = sa ^ sb;

  reg [31:0] special;
  reg        is_special;
  always @(*) begin
    is_special = 1'b1;
    if (a_nan) special = {a[31:23], 1'b1, fa[21:0]};
    else if (b_nan) special = {b[31:23], 1'b1, fb[21:0]};
    else if ((a_inf && b_zero) || (a_zero && b_inf)) special = 32'hFFC00000;
    else if (a_inf || b_inf) special = {sign, 8'hFF, 23'd0};
    else if (a_zero || b_zero) special = {sign, 31'd0};
    else begin
      special = 32'd0;
      is_special = 1'b0;
    end
  end

  // Shift a nonzero significand up to a leading 1 in bit 23; n = the shift (0..23).
  function [28:0] norm24(input [23:0] v);  // {n[4:0], shifted[23:0]}
    reg [23:0] x;
    reg [4:0] n;
    begin
      x = v;
      n[4] = (x[23:8] == 16'd0);
      if (n[4]) x = {x[7:0], 16'd0};
      n[3] = (x[23:16] == 8'd0);
      if (n[3]) x = {x[15:0], 8'd0};
      n[2] = (x[23:20] == 4'd0);
      if (n[2]) x = {x[19:0], 4'd0};
      n[1] = (x[23:22] == 2'd0);
      if (n[1]) x = {x[21:0], 2'd0};
      n[0] = !x[23];
      if (n[0]) x = {x[22:0], 1'b0};
      norm24 = {n, x};
    end
  endfunction

  wire [28:0] na = norm24({ea != 8'd0, fa}), nb = norm24({eb != 8'd0, fb});
  // exponents as signed 10-bit: a subnormal counts as exponent 1, minus its shift
  wire signed [9:0] xa = $signed({2'b00, (ea == 8'd0) ? 8'd1 : ea}) - $signed({5'd0, na[28:24]});
  wire signed [9:0] xb = $signed({2'b00, (eb == 8'd0) ? 8'd1 : eb}) - $signed({5'd0, nb[28:24]});

  reg [23:0] s1_ma, s1_mb;
  reg signed [9:0] s1_xa, s1_xb;
  reg        s1_sign, s1_sp;
  reg [31:0] s1_special;
  always @(posedge clk)
    if (en) begin
      s1_ma <= na[23:0];
      s1_mb <= nb[23:0];
      s1_xa <= xa;
      s1_xb <= xb;
      s1_sign <= sign;
      s1_sp <= is_special;
      s1_special <= special;
    end

  // ---- stage 2: partial products, exponent sum -----------------------------------------
  reg [35:0] s2_lo, s2_hi;  // ma * mb[11:0], ma * mb[23:12]
  reg signed [10:0] s2_exp, s2_exp1;  // biased exponent of the product, leading 1 in bit 46 / 47
  reg        s2_sign, s2_sp;
  reg [31:0] s2_special;
  always @(posedge clk)
    if (en) begin
      s2_lo <= s1_ma * s1_mb[11:0];
      s2_hi <= s1_ma * s1_mb[23:12];
      s2_exp <= $signed({s1_xa[9], s1_xa}) + $signed({s1_xb[9], s1_xb}) - 11'sd127;
      s2_exp1 <= $signed({s1_xa[9], s1_xa}) + $signed({s1_xb[9], s1_xb}) - 11'sd126;
      s2_sign <= s1_sign;
      s2_sp <= s1_sp;
      s2_special <= s1_special;
    end

  // ---- stage 3: the product; exponent, subnormal shift and overflow for both places
  // of its leading 1 (bit 47 or 46), so that stage 4 only selects ---------------------------
  function [14:0] exp_info(input signed [10:0] e);  // {over, shift[5:0], efield[7:0]}
    reg signed [11:0] sh;
    reg tiny;
    begin
      tiny = (e < 11'sd1);
      sh = 12'sd1 - $signed({e[10], e});
      exp_info[14] = !tiny && (e >= 11'sd255);
      exp_info[13:8] = !tiny ? 6'd0 : ((sh > 12'sd50) ? 6'd50 : sh[5:0]);
      // e is in [1, 254] unless tiny or overflow (then the field is 0, or unused)
      exp_info[7:0] = tiny ? 8'd0 : e[7:0] - 8'd1;
    end
  endfunction

  reg [47:0] s3_prod;
  reg [14:0] s3_info0, s3_info1;  // leading 1 in bit 46 / in bit 47
  reg        s3_sign, s3_sp;
  reg [31:0] s3_special;
  always @(posedge clk)
    if (en) begin
      s3_prod <= {12'd0, s2_lo} + {s2_hi, 12'd0};
      s3_info0 <= exp_info(s2_exp);
      s3_info1 <= exp_info(s2_exp1);
      s3_sign <= s2_sign;
      s3_sp <= s2_sp;
      s3_special <= s2_special;
    end

  // ---- stage 4: normalise to a leading 1 in bit 47, select the exponent information ---------
  wire [14:0] info = s3_prod[47] ? s3_info1 : s3_info0;
  reg [47:0] s4_m;
  reg [5:0]  s4_shift;
  reg        s4_over, s4_sign, s4_sp;
  reg [7:0]  s4_efield;
  reg [31:0] s4_special;
  always @(posedge clk)
    if (en) begin
      s4_m <= s3_prod[47] ? s3_prod : {s3_prod[46:0], 1'b0};
      s4_over <= info[14];
      s4_shift <= info[13:8];
      s4_efield <= info[7:0];
      s4_sign <= s3_sign;
      s4_sp <= s3_sp;
      s4_special <= s3_special;
    end

  // ---- stage 5: subnormal shift, coarse part (multiples of 8) ------------------------------
  // Only bits [95:64] of the coarse result can reach the kept 25 bits after a fine shift of
  // at most 7; everything below only feeds the sticky bit.
  wire [95:0] coarse = {s4_m, 48'd0} >> {s4_shift[5:3], 3'b000};
  reg [31:0] s5_hi;
  reg [2:0]  s5_fine;
  reg        s5_sticky, s5_over, s5_sign, s5_sp;
  reg [7:0]  s5_efield;
  reg [31:0] s5_special;
  always @(posedge clk)
    if (en) begin
      s5_hi <= coarse[95:64];
      s5_sticky <= |coarse[63:0];
      s5_fine <= s4_shift[2:0];
      s5_over <= s4_over;
      s5_efield <= s4_efield;
      s5_sign <= s4_sign;
      s5_sp <= s4_sp;
      s5_special <= s4_special;
    end

  // ---- stage 6: fine shift (0..7): the 24 kept bits, the guard bit, the sticky bit ---------
  wire [39:0] fine = {s5_hi, 8'd0} >> s5_fine;
  reg [24:0] s6_sig;  // 24 kept bits and the guard bit
  reg        s6_sticky, s6_over, s6_sign, s6_sp;
  reg [7:0]  s6_efield;
  reg [31:0] s6_special;
  always @(posedge clk)
    if (en) begin
      s6_sig <= fine[39:15];
      s6_sticky <= s5_sticky | (|fine[14:0]);
      s6_over <= s5_over;
      s6_efield <= s5_efield;
      s6_sign <= s5_sign;
      s6_sp <= s5_sp;
      s6_special <= s5_special;
    end

  // ---- stage 7: round to nearest even, pack -----------------------------------------------
  wire [23:0] sig = s6_sig[24:1];
  wire        round_up = s6_sig[0] & (s6_sticky | sig[0]);
  wire [30:0] pk = {s6_efield, 23'd0} + {7'd0, sig} + {30'd0, round_up};
  reg [31:0] s7_finite, s7_special;
  reg        s7_sp;
  always @(posedge clk)
    if (en) begin
      s7_finite <= s6_over ? {s6_sign, 8'hFF, 23'd0} : {s6_sign, pk};
      s7_sp <= s6_sp;
      s7_special <= s6_special;
    end

  // ---- stage 8: select ---------------------------------------------------------------------
  reg [31:0] s8_p;
  always @(posedge clk)
    if (en) s8_p <= s7_sp ? s7_special : s7_finite;
  assign p = s8_p;
endmodule
