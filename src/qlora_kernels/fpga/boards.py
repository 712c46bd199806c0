"""FPGA boards the performance model knows: memory system, clocks and fabric resources.

Every number carries its source. Numbers marked in ``unverified`` were taken from the
vendor's product tables from memory and could not be re-checked against the data sheet in
this repository's sessions; check them before relying on a result for that board."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Board:
    key: str
    name: str
    device: str
    family: str                  # "ultrascale+", "versal" or "agilex7": picks operator costs
    kernel_clock_mhz: float      # clock the HLS kernels are assumed to close at
    memory: str                  # "HBM2", "HBM2e"
    memory_gb: float
    peak_gbps: float             # theoretical memory bandwidth, GB/s (1e9 bytes/s)
    channels: int                # pseudo-channels
    port_binding: str            # "channel": a kernel port owns whole channels (U280 switch
                                 # crossings cost bandwidth); "noc": a NoC interleaves any port
    max_ports: int               # memory ports the kernels can own
    efficiency: float            # achievable fraction of peak for long sequential bursts
    efficiency_source: str
    luts: int                    # 6-input LUTs (Agilex: ALUTs = 2 per ALM)
    ffs: int
    dsps: int                    # DSP48E2 / DSP58 / Agilex variable-precision DSP blocks
    brams: int                   # BRAM36 (AMD) or M20K (Intel) blocks
    bram_kind: str               # "BRAM36" or "M20K"
    urams: int                   # UltraRAM 288 Kb blocks (0: none)
    shell_fraction: float        # fabric taken by the vendor's static shell/platform
    slrs: int = 1                # super logic regions (stacked dies) the fabric is split into
    memory_slr: int = 0          # the SLR whose edge holds the HBM and its AXI ports
    sources: tuple[str, ...] = ()
    unverified: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def channel_gbps(self) -> float:
        return self.peak_gbps / self.channels

    @property
    def effective_gbps(self) -> float:
        return self.peak_gbps * self.efficiency

    def available(self) -> dict[str, float]:
        """Resources left to user kernels once the shell is placed."""
        keep = 1.0 - self.shell_fraction
        return {"dsp": self.dsps * keep, "lut": self.luts * keep, "ff": self.ffs * keep,
                "bram": self.brams * keep, "uram": self.urams * keep}


_SHUHAI = ("Shuhai (Wang, Huang, Zhang, Alonso, FCCM 2020, doi:10.1109/FCCM48280.2020.00024) measured up to "
           "425 GB/s (92%) on the U280 HBM with each AXI port on its own pseudo-channel; 0.90 is taken")

BOARDS: dict[str, Board] = {
    "u280": Board(
        key="u280", name="AMD Alveo U280", device="XCU280 (Virtex UltraScale+ HBM, VU37P class)",
        family="ultrascale+", kernel_clock_mhz=300.0, memory="HBM2", memory_gb=8, peak_gbps=460.0, channels=32,
        port_binding="channel", max_ports=32, efficiency=0.90, efficiency_source=_SHUHAI,
        luts=1_304_000, ffs=2_607_000, dsps=9_024, brams=2_016, bram_kind="BRAM36", urams=960, shell_fraction=0.10,
        slrs=3, memory_slr=0,
        sources=(
            "AMD DS963, Alveo U280 Data Center Accelerator Card Data Sheet: 8 GB HBM2 at 460 GB/s, 1,304K LUTs, "
            "2,607K registers, 9,024 DSP slices, 2,016 BRAM36 (70.9 Mb), 960 UltraRAM (270 Mb)",
            "AMD UG1393 (Vitis), 'HBM Configuration and Use': 32 pseudo-channels x 14.375 GB/s = 460 GB/s, "
            "32 HBM AXI interfaces",
            "Kernel clock: the xilinx_u280 Vitis platforms' default kernel clock is 300 MHz",
            "AMD UG1120 (Alveo U280 platform): three SLRs; the HBM stacks and their AXI switch sit at the "
            "bottom edge of SLR0",
        ),
        notes=("shell_fraction 0.10 is an estimate of the static region of the gen3x16 XDMA platforms; "
               "`platforminfo` gives the exact figure",),
    ),
    "u55c": Board(
        key="u55c", name="AMD Alveo U55C", device="XCU55C (Virtex UltraScale+ HBM)",
        family="ultrascale+", kernel_clock_mhz=300.0, memory="HBM2", memory_gb=16, peak_gbps=460.0, channels=32,
        port_binding="channel", max_ports=32, efficiency=0.90, efficiency_source=_SHUHAI + " (same HBM subsystem)",
        luts=1_304_000, ffs=2_607_000, dsps=9_024, brams=2_016, bram_kind="BRAM36", urams=960, shell_fraction=0.10,
        slrs=3, memory_slr=0,
        sources=(
            "AMD DS978, Alveo U55C Data Center Accelerator Cards Data Sheet: 16 GB HBM2 at 460 GB/s, 1,304K LUTs, "
            "2,607K registers, 9,024 DSP slices, 2,016 BRAM36, 960 UltraRAM",
            "AMD UG1393 (Vitis), 'HBM Configuration and Use': 512 MB pseudo-channels on the U55C, 32 x 14.375 GB/s",
            "Three SLRs with the HBM at SLR0, as on the U280 (the same HBM-series die family)",
        ),
        unverified=("slrs",),
    ),
    "v80": Board(
        key="v80", name="AMD Alveo V80", device="XCV80 (Versal HBM series)",
        family="versal", kernel_clock_mhz=300.0, memory="HBM2e", memory_gb=32, peak_gbps=820.0, channels=32,
        port_binding="noc", max_ports=64, efficiency=0.85,
        efficiency_source="no published FPGA-side measurement was at hand; 0.85 assumed for NoC-routed HBM2e",
        luts=1_188_000, ffs=2_376_000, dsps=10_848, brams=3_741, bram_kind="BRAM36", urams=1_925, shell_fraction=0.10,
        sources=(
            "AMD Alveo V80 product brief: 32 GB HBM2e with 820 GB/s (theoretical), 2.6M logic cells, 10,848 DSP",
            "Versal LUTs = system logic cells / 2.1875 (AMD's Versal convention), so ~1,188K LUTs",
            "AMD AM004 (Versal DSP Engine): DSPFP32 mode does an fp32 multiply and add in one DSP58",
        ),
        unverified=("luts", "ffs", "brams", "urams", "channels", "max_ports", "slrs"),
        notes=("kernel clock kept at the HLS target (300 MHz); Versal PL usually closes higher",
               "modelled as one fabric region: the NoC carries every port to the HBM, so no CU's memory path "
               "crosses a die boundary in the fabric"),
    ),
    "agilex7m": Board(
        key="agilex7m", name="Intel Agilex 7 FPGA M-Series Development Kit", device="AGMF039R47A1E2VR0",
        family="agilex7", kernel_clock_mhz=400.0, memory="HBM2e", memory_gb=32, peak_gbps=820.0, channels=32,
        port_binding="channel", max_ports=32, efficiency=0.85,
        efficiency_source="no published measurement at hand; 0.85 assumed for HBM2e behind the hard memory NoC",
        luts=2_611_200, ffs=5_222_400, dsps=12_300, brams=12_950, bram_kind="M20K", urams=0, shell_fraction=0.10,
        sources=(
            "Intel AN 1020 (FPGA AI Suite with HBM): Agilex 7 M-Series integrates two HBM2e stacks, eight "
            "controllers per stack, each channel split into two pseudo-channels (32 in all)",
            "Bandwidth: 2 stacks x 1024 bits x 3.2 Gb/s = 819 GB/s",
            "Intel Agilex 7 M-Series product table, AGM 039: 1,305,600 ALMs (2 ALUTs each), 12,300 DSP blocks "
            "(native IEEE fp32 multiply-add), 12,950 M20K",
            "Kernel clock 400 MHz: an assumption for HLS kernels on Agilex 7 (Hyperflex registers)",
        ),
        unverified=("luts", "ffs", "dsps", "brams", "kernel_clock_mhz", "slrs"),
    ),
}


def get_board(key: str | Board) -> Board:
    if isinstance(key, Board):
        return key
    k = str(key).lower().replace("-", "").replace("_", "").replace(" ", "")
    aliases = {"alveou280": "u280", "alveou55c": "u55c", "alveov80": "v80", "agilex7": "agilex7m",
               "agilex": "agilex7m", "agilexm": "agilex7m"}
    k = aliases.get(k, k)
    if k not in BOARDS:
        raise ValueError(f"board: unknown board {key!r}; known boards: {sorted(BOARDS)}")
    return BOARDS[k]
