"""Benchmarks and reports: decode, prefill and KV handoff against the machine's measured bounds
and their peers, the profiler's reports, autotuner, published figures and plots. No argument
parsing and no printing: the `wafer` command line (cli/) does both."""
