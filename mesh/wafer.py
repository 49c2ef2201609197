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

    Per-core rates are the vendor's aggregate figures divided by the vendor's core count.
    """

    name: str
    max_rows: int  # largest core grid the wafer offers
    max_cols: int
    sram_per_core: int  # bytes
    clock_hz: float
    # Fabric: a 32-bit message reaches a neighbouring core in one cycle.
    link_bytes_per_cycle: int = 4
    routes_per_core: int = 24  # "colors"
    vendor_cores: int = 850_000
    sram_bandwidth: float = 20e15  # bytes/s, whole wafer
    peak_flops: float = 7.5e15  # 16-bit FLOP/s, whole wafer
    hop_cycles: float = 1.0  # one mesh hop per 32-bit wavelet (DESIGN.md reference facts)
    # A core that receives a message, adds it in and sends it on (one routing stage of a
    # reduction) pays task activation and a vector-op start-up before its first word leaves. An
    # assumption of the order of tens of cycles (not a vendor figure), applied to every schedule.
    stage_cycles: float = 20.0
    # A hand-off of activations between wafers (Ethernet-class link between systems): an
    # assumption, used only when a model needs more than one wafer.
    wafer_hop_s: float = 5e-6

    @property
    def cores(self) -> int:
        return self.max_rows * self.max_cols

    @property
    def core_flops_per_cycle(self) -> float:
        return self.peak_flops / self.vendor_cores / self.clock_hz

    @property
    def core_bytes_per_cycle(self) -> float:
        """SRAM bytes one core reads per cycle."""
        return self.sram_bandwidth / self.vendor_cores / self.clock_hz


# WSE-2: 850,000 cores, 40 GB SRAM (48 KB per core). WSE-3: 900,000 cores, 44 GB, ~48 KB per core.
# The usable rectangular grids are the ones WaferLLM and Cerebras report (~750 x 994 on WSE-2).
# WSE-2 peak: 4-wide 16-bit FMAC per core per cycle (8 FLOP/cycle), 7.5 PFLOP/s over the wafer;
# WSE-3 peak: the vendor's 125 PFLOP/s. Decode is bound by memory and fabric, not by these.
WSE2 = WaferSpec("wse2", max_rows=750, max_cols=994, sram_per_core=48 * KIB, clock_hz=1.1e9,
                 vendor_cores=850_000, sram_bandwidth=20e15, peak_flops=7.5e15)
WSE3 = WaferSpec("wse3", max_rows=750, max_cols=1200, sram_per_core=48 * KIB, clock_hz=1.1e9,
                 vendor_cores=900_000, sram_bandwidth=21e15, peak_flops=125e15)
SPECS = {s.name: s for s in (WSE2, WSE3)}


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
