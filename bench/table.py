"""Benchmark reports as aligned `label  value` lines for a terminal."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a benchmark table."""

    label: str
    value: str


def aligned(rows: list[Row]) -> str:
    """`label  value` lines with the values aligned, for a terminal."""
    width = max(len(row.label) for row in rows)
    return "\n".join(f"{row.label:<{width}}  {row.value}" for row in rows)


def env_row(env: dict) -> Row:
    """The `env` line of a benchmark table: versions, devices, CPUs and the load average."""
    return Row("env", f"jax {env['jax']} on {env['device_count']} x {env['device_kind']}, "
                      f"{env['cpu_count']} CPUs ({env['cpu_model']})"
                      + (f", torch {env['torch']}" if "torch" in env else "")
                      + (f", load average {env['loadavg_1m_start']} -> {env['loadavg_1m_end']}"
                         if "loadavg_1m_start" in env else ""))
