"""The serving system: a scheduler that is pure policy over events (admission, prefill batching,
slots, the handoff queue, continuous batching), the per-request timings its metrics read, and the
engine that drives it on the wall clock over worker processes (engine.py; the workers' programs in
workers.py, their messages in worker_messages.py)."""
