"""The machine: wafer specs, grids, executors, CPU-device emulation, the SRAM planner."""
