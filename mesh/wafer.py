"""Wafer specifications: the machines a layout is planned for.

Figures are the vendors' and WaferLLM's (see DESIGN.md, "Reference facts"). An emulated spec
stands for meshes where one device plays a block of cores: its per-core budget is the user's.
"""

from __future__ import annotations

import dataclasses

from mesh.errors import WaferError

KIB = 1024


@dataclasses.dataclass(frozen=True)
class WaferSpec:
    """A wafer, and the constants of the cost model (mesh/cost_model.py) that describe it.

    Every constant is a published hardware figure, or derived from one, and says where it comes
    from beside it; `CONSTANT_SOURCES` repeats the sources for reports. Two are calibrated (on
    WaferLLM's Llama3-8B and Qwen2-72B decode rows at 420x420 only; `CALIBRATED`) and say so;
    `calibrate` in bench/published.py starts them from their hardware values (5 cycles, 1.0).
    Per-core rates are the vendor's aggregate figures divided by the vendor's core count.
    """

    name: str
    max_rows: int  # largest core grid the wafer offers to a program
    max_cols: int
    sram_per_core: int  # bytes
    clock_hz: float
    # Fabric: one 32-bit wavelet per cycle per link direction (Cerebras SDK docs, "A Conceptual
    # View": a wavelet is 32 bits of payload plus a 5-bit color; Luczynski et al., HPDC'24).
    link_bytes_per_cycle: int = 4
    routes_per_core: int = 24  # routable colors per router (Cerebras SDK docs, WSE-2)
    vendor_cores: int = 850_000
    sram_bandwidth: float = 20e15  # bytes/s, whole wafer (vendor figure)
    peak_flops: float = 7.5e15  # 16-bit FLOP/s, whole wafer
    # A wavelet moves one hop per cycle (Luczynski et al., HPDC'24, measured on the WSE: its
    # model's link term is one cycle per hop).
    hop_cycles: float = 1.0
    # A routing stage of a reduction: the wavelet leaves the router for the core, the core adds
    # it in, and sends it back to the router: 2 T_R + 1 = 5 cycles, T_R ~= 2 the router latency
    # Luczynski et al. measured on the WSE (their depth term (2 T_R + 1) D), for a stream already
    # flowing. CALIBRATED to 9.62 (from 5): a stage of a program also starts a task and a vector op
    # per message (WaferLLM's all-reduce phases are separate fabric DSD operations).
    stage_cycles: float = 9.62
    # Fraction of the vector unit's peak a small-tile GEMV reaches: each fmac instruction streams
    # one short row of a tile (10 to 70 elements in WaferLLM's decode) and pays its start-up.
    # CALIBRATED to 0.356 (from 1.0): ~2.8 of the 8 FLOP/cycle peak, 1.4 FMAC per cycle.
    compute_efficiency: float = 0.356
    # Between wafers: activations leave through the system's I/O, 1.2 Tb/s per CS-2 and CS-3
    # (12 x 100 GbE; Cerebras/ALCF system descriptions). The latency of one system-to-system
    # hand-off is an assumption (a switched 100 GbE hop and the system's I/O path), not a vendor
    # figure.
    io_bytes_per_s: float = 1.2e12 / 8
    wafer_latency_s: float = 5e-6

    @property
    def cores(self) -> int:
        return self.max_rows * self.max_cols

    @property
    def core_flops_per_cycle(self) -> float:
        """FLOPs one core completes per cycle on decode's small tiles (peak x compute_efficiency)."""
        return self.peak_flops / self.vendor_cores / self.clock_hz * self.compute_efficiency

    @property
    def core_bytes_per_cycle(self) -> float:
        """SRAM bytes one core reads per cycle."""
        return self.sram_bandwidth / self.vendor_cores / self.clock_hz

    def wafer_hop_s(self, nbytes: int) -> float:
        """Seconds to hand `nbytes` of activations from one wafer to the next (I/O and latency)."""
        return self.wafer_latency_s + nbytes / self.io_bytes_per_s


# WSE-2: 850,000 cores, 40 GB SRAM (48 KB per core), 20 PB/s (vendor). Clock 1.1 GHz: WaferLLM's
# own cycles-to-seconds conversion (MeshInfra/WaferLLM Decode/WSE-2/launch_wse2.py, freq_ghz = 1.1).
# Program grid 750 x 994: WaferLLM compiles on a 757 x 996 fabric, less the memcpy halo of 7
# columns and 2 rows (Decode/WSE-2/compile.py; Cerebras SDK fabric-dimension rules).
# Peak: 4-wide 16-bit FMAC per core per cycle, 8 FLOP/cycle: 7.5 PFLOP/s over the wafer.
# WSE-3: 900,000 cores, 44 GB, 21 PB/s (vendor). Peak: 8-wide 16-bit FMAC per core per cycle, up
# from WSE-2's 4-wide (The Next Platform, 2024-03-14; the vendor's "2x WSE-2"), 16 FLOP/cycle:
# 15.84 PFLOP/s dense over the wafer. The vendor's 125 PFLOP/s counts sparsity; taking it as the
# dense rate made a WSE-3 core 16x a WSE-2 core and priced decode's GEMVs at ~0.
# Program grid 755 x 1170: WaferLLM's WSE-3 fabric 762 x 1172
# less the same halo (Decode/WSE-3/compile.py). Clock: the vendor gives none; WaferLLM converts
# WSE-3 cycles at 1.1 GHz too (Decode/WSE-3/launch_wse3.py).
WSE2 = WaferSpec("wse2", max_rows=750, max_cols=994, sram_per_core=48 * KIB, clock_hz=1.1e9,
                 vendor_cores=850_000, sram_bandwidth=20e15, peak_flops=7.5e15)
WSE3 = WaferSpec("wse3", max_rows=755, max_cols=1170, sram_per_core=48 * KIB, clock_hz=1.1e9,
                 vendor_cores=900_000, sram_bandwidth=21e15, peak_flops=16 * 900_000 * 1.1e9)
SPECS = {s.name: s for s in (WSE2, WSE3)}

# Where each constant comes from, for reports (the comments above say the same at more length).
CONSTANT_SOURCES = {
    "clock_hz": "1.1 GHz: WaferLLM's cycle conversion (Decode/WSE-2/launch_wse2.py)",
    "link_bytes_per_cycle": "one 32-bit wavelet per cycle per link direction (Cerebras SDK docs; Luczynski et al. HPDC'24)",
    "hop_cycles": "1 cycle per hop (Luczynski et al. HPDC'24, measured on the WSE)",
    "stage_cycles": "calibrated 9.62 on WaferLLM 8B+72B at 420^2; hardware floor 2 T_R + 1 = 5, T_R ~ 2 router "
                    "cycles (Luczynski et al. HPDC'24)",
    "compute_efficiency": "calibrated 0.356 on WaferLLM 8B+72B at 420^2: share of the 4-wide 16-bit FMAC peak "
                          "(8 FLOP/cycle) on decode's short rows",
    "core_sram_bytes_per_cycle": "vendor aggregate SRAM bandwidth / cores / clock (20 PB/s WSE-2, 21 PB/s WSE-3)",
    "core_flops_per_cycle": "dense 16-bit FMAC width x 2 (4-wide WSE-2, 8-wide WSE-3: The Next Platform 2024-03-14) "
                            "x compute_efficiency",
    "io_bytes_per_s": "1.2 Tb/s system I/O per CS-2/CS-3 (12 x 100 GbE)",
    "wafer_latency_s": "5 us per wafer-to-wafer hand-off: an assumption, not a vendor figure",
}
# The two calibrated constants. `wafer profile --calibrate` (bench/published.py `calibrate`) solves
# them so that the profiler's one-layer time equals WaferLLM's on exactly two cells of its decode
# table, Llama3-8B and Qwen2-72B at 420 x 420 (11.57 and 14.89 us per layer); it gives 9.617 and
# 0.3557, rounded here. Every other cell of the table is a prediction. WSE-3 uses the same values
# (an assumption: no WSE-3 decode measurement is in the table).
CALIBRATED: tuple[str, ...] = ("stage_cycles", "compute_efficiency")


def emulated_spec(sram_per_core: int, name: str = "emulated") -> WaferSpec:
    """A spec for an emulated mesh with a chosen per-core budget (bytes) and no grid limit."""
    if sram_per_core <= 0:
        raise WaferError(f"per-core budget must be positive, got {sram_per_core}")
    return WaferSpec(name, max_rows=1 << 20, max_cols=1 << 20, sram_per_core=sram_per_core, clock_hz=1.1e9)


def parse_bytes(text: str) -> int:
    """'48KiB', '2MiB', '1.5GiB', '1000' -> bytes."""
    units = {"kib": KIB, "mib": KIB ** 2, "gib": KIB ** 3, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "b": 1}
    t = text.strip().lower()
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], mult
            break
    else:
        scale = 1
    try:
        value = float(t)
    except ValueError:
        raise WaferError(f"size {text!r}: expected a number with an optional unit (KiB, MiB, GiB)") from None
    return int(value * scale)
