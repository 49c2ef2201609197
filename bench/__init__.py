"""The `wafer` command line and the benchmarks."""
