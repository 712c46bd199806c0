// Test top for the fp32 operators alone: one (a, b) pair per cycle into qk_fadd and
// qk_fmul side by side (tests/test_rtl.py checks both bit for bit against the CPU).
module qk_fp_tb_top (
    input  wire        clk,
    input  wire [31:0] a,
    input  wire [31:0] b,
    output wire [31:0] sum,
    output wire [31:0] prod
);
  qk_fadd add (.clk(clk), .en(1'b1), .a(a), .b(b), .s(sum));
  qk_fmul mul (.clk(clk), .en(1'b1), .a(a), .b(b), .p(prod));
endmodule
