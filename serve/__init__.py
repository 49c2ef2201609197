"""The serving system: a scheduler that is pure policy over events (admission, prefill batching,
slots, the handoff queue, continuous batching), and the per-request timings its metrics read."""
