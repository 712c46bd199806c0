// The decode datapath as it sits behind the memory readers: the packed-code stream and
// the per-block absmax stream in, fp32 beats out (qk_scale_seq + qk_decode_unit). This is
// the unit the Verilator tests drive and Yosys synthesizes.
`include "qk_params.vh"
module qk_decode_top #(
    parameter LANES = `QK_DECODE_LANES
) (
    input  wire                clk,
    input  wire                rst,
    input  wire                cb_we,
    input  wire [3:0]          cb_addr,
    input  wire [31:0]         cb_data,
    input  wire [15:0]         beats_per_block,
    input  wire                in_valid,
    output wire                in_ready,
    input  wire [LANES*4-1:0]  in_codes,
    input  wire                s_valid,
    output wire                s_ready,
    input  wire [31:0]         s_absmax,
    output wire                out_valid,
    output wire [LANES*32-1:0] out_values
);
  wire have;
  wire [31:0] absmax;
  wire beat = in_valid && have;
  assign in_ready = have;
  qk_scale_seq seq (
      .clk(clk), .rst(rst), .beats_per_block(beats_per_block), .s_valid(s_valid), .s_absmax(s_absmax),
      .s_ready(s_ready), .beat(beat), .have(have), .absmax(absmax)
  );
  qk_decode_unit #(.LANES(LANES)) unit (
      .clk(clk), .rst(rst), .cb_we(cb_we), .cb_addr(cb_addr), .cb_data(cb_data), .in_valid(beat),
      .in_codes(in_codes), .in_absmax(absmax), .out_valid(out_valid), .out_values(out_values)
  );
endmodule
