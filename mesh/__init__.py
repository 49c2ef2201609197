"""The machine: axis and scope names, grids and executors, CPU-device emulation, wafer specs,
tensor descriptions and their tiling, the SRAM planner, multi-wafer staging, the jaxpr tracer and
the cost model. Knows nothing of models."""
