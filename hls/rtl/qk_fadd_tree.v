// A balanced binary tree of qk_fadd over N inputs (N a power of two): level 1 adds inputs
// (0,1), (2,3), ...; latency log2(N) * 6 cycles.
module qk_fadd_tree #(
    parameter N = 2
) (
    /* verilator lint_off UNUSEDSIGNAL */  // a one-input tree is a wire
    input  wire            clk,
    /* verilator lint_on UNUSEDSIGNAL */
    input  wire [32*N-1:0] in,
    output wire [31:0]     out
);
  generate
    if (N == 1) begin : leaf
      assign out = in;
    end else begin : node
      wire [32*(N/2)-1:0] level;
      genvar i;
      for (i = 0; i < N / 2; i = i + 1) begin : pair
        qk_fadd fa (.clk(clk), .en(1'b1), .a(in[64*i+31 -: 32]), .b(in[64*i+63 -: 32]), .s(level[32*i+31 -: 32]));
      end
      qk_fadd_tree #(.N(N / 2)) up (.clk(clk), .in(level), .out(out));
    end
  endgenerate
endmodule
