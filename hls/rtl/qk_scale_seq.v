// Feeds qk_decode_unit one absmax per beat from a stream of one absmax per block: each
// value is used for beats_per_block consecutive beats (blocksize / LANES), then the next
// is taken (s_ready pulses for one cycle). The stream is an AXI-stream-style
// valid/ready pair; the unit's input beat is valid only while an absmax is held.
module qk_scale_seq (
    input  wire        clk,
    input  wire        rst,
    input  wire [15:0] beats_per_block,  // blocksize / LANES, >= 1
    input  wire        s_valid,
    input  wire [31:0] s_absmax,
    output wire        s_ready,
    input  wire        beat,             // a code beat is consumed this cycle
    output wire        have,             // an absmax is held
    output wire [31:0] absmax
);
  reg [31:0] cur;
  reg        full;
  reg [15:0] used;
  wire last = beat && full && (used + 16'd1 == beats_per_block);
  assign s_ready = !full || last;
  assign have = full;
  assign absmax = cur;
  always @(posedge clk) begin
    if (rst) begin
      full <= 1'b0;
      used <= 16'd0;
    end else begin
      if (s_ready && s_valid) begin
        cur <= s_absmax;
        full <= 1'b1;
        used <= 16'd0;
      end else if (last) begin
        full <= 1'b0;
        used <= 16'd0;
      end else if (beat && full) begin
        used <= used + 16'd1;
      end
    end
  end
endmodule
