// The NF4/FP4 decode unit: LANES 4-bit codes per cycle in, LANES fp32 values out,
//   out[j] = code[nibble j] * absmax          (qk_fmul: one fp32 multiply, RNE, bit-exact)
// exactly as dequantize_4bit and hls/qk_decode.cpp. The 16-entry codebook is written at
// run time through cb_we/cb_addr/cb_data (never compiled in: the host loads the format's
// table, formats.codebook()). Nibble order is bitsandbytes': element 2i of the beat is the
// high nibble of byte i. One absmax per beat: the blocksizes are multiples of LANES, so a
// beat never straddles two blocks (qk_scale_seq repeats each block's absmax).
// Latency 9 cycles (codebook lookup, then qk_fmul's 8 stages), one beat per cycle.
module qk_decode_unit #(
    parameter LANES = 16
) (
    input  wire                  clk,
    input  wire                  rst,
    input  wire                  cb_we,
    input  wire [3:0]            cb_addr,
    input  wire [31:0]           cb_data,
    input  wire                  in_valid,
    input  wire [LANES*4-1:0]    in_codes,   // byte i = bits [8i+7:8i]
    input  wire [31:0]           in_absmax,
    output wire                  out_valid,
    output wire [LANES*32-1:0]   out_values  // lane j = bits [32j+31:32j]
);
  reg [LANES*32-1:0] code_q;
  reg [31:0] absmax_q;
  localparam DEPTH = 9;
  reg [DEPTH-1:0] valid_q;  // valid through the stages
  always @(posedge clk) begin
    if (rst) valid_q <= {DEPTH{1'b0}};
    else valid_q <= {valid_q[DEPTH-2:0], in_valid};
  end

  genvar j;
  generate
    for (j = 0; j < LANES; j = j + 1) begin : lane
      // element j: byte j/2, high nibble for even j (a one-lane instance, for synthesis
      // reports per lane, takes its code in bits [3:0])
      wire [3:0] nib;
      if (LANES == 1) begin : one
        assign nib = in_codes[3:0];
      end else if (j % 2 == 0) begin : hi
        assign nib = in_codes[8*(j/2)+7 : 8*(j/2)+4];
      end else begin : lo
        assign nib = in_codes[8*(j/2)+3 : 8*(j/2)];
      end
      // Each lane has its own copy of the codebook (16 x 32 bits of LUT RAM, one write
      // port shared by all): one read port per copy maps onto distributed RAM directly; a
      // single table with 16 read ports took Yosys past 20 GB.
      reg [31:0] rom[0:15];
      always @(posedge clk)
        if (cb_we) rom[cb_addr] <= cb_data;
      always @(posedge clk) code_q[32*j+31:32*j] <= rom[nib];
      qk_fmul mul (
          .clk(clk),
          .en (1'b1),
          .a  (code_q[32*j+31:32*j]),
          .b  (absmax_q),
          .p  (out_values[32*j+31:32*j])
      );
    end
  endgenerate
  always @(posedge clk) absmax_q <= in_absmax;
  assign out_valid = valid_q[DEPTH-1];
endmodule
