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
    name: str
    max_rows: int  # largest core grid the wafer offers
    max_cols: int
    sram_per_core: int  # bytes
    clock_hz: float
    # Fabric: a 32-bit message reaches a neighbouring core in one cycle.
    link_bytes_per_cycle: int = 4
    routes_per_core: int = 24  # "colors"

    @property
    def cores(self) -> int:
        return self.max_rows * self.max_cols


# WSE-2: 850,000 cores, 40 GB SRAM (48 KB per core). WSE-3: 900,000 cores, 44 GB, ~48 KB per core.
# The usable rectangular grids are the ones WaferLLM and Cerebras report (~750 x 994 on WSE-2).
WSE2 = WaferSpec("wse2", max_rows=750, max_cols=994, sram_per_core=48 * KIB, clock_hz=1.1e9)
WSE3 = WaferSpec("wse3", max_rows=750, max_cols=1200, sram_per_core=48 * KIB, clock_hz=1.1e9)
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
