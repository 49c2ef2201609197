"""The server's Prometheus metrics, on a registry of its own (one per server, so tests can run
several in one process). The engine records what its workers report (steps, handoffs, queue,
slots); the front end records what its clients see (TTFT, TPOT, end-to-end latency)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: 1 ms to 2 minutes, roughly x2 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 34, 2))  # 1 KiB .. 8 GiB


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("wafer_time_to_first_token_seconds", "Arrival to first output token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("wafer_time_per_output_token_seconds", "Mean gap between output tokens after the first",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("wafer_e2e_request_latency_seconds", "Arrival to the end of the request", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.requests = Counter("wafer_requests", "Requests that ended, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("wafer_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("wafer_generation_tokens", "Output tokens streamed", registry=r)
        self.queue_depth = Gauge("wafer_queue_depth", "Requests in the waiting queue", registry=r)
        self.slots_in_use = Gauge("wafer_slots_in_use", "Decode slots reserved or decoding", registry=r)
        self.prefill_step = Histogram("wafer_prefill_batch_seconds", "Time of one prefill batch", registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.decode_step = Histogram("wafer_decode_step_seconds", "Time of one decode step", registry=r,
                                     buckets=LATENCY_BUCKETS)
        self.handoff_seconds = Histogram("wafer_kv_handoff_seconds", "Prefill done to cache committed in a slot",
                                         registry=r, buckets=LATENCY_BUCKETS)
        self.handoff_bytes = Histogram("wafer_kv_handoff_bytes", "KV bytes shipped per handoff", registry=r,
                                       buckets=BYTES_BUCKETS)
        self.worker_restarts = Counter("wafer_worker_restarts", "Worker processes restarted", ["worker"], registry=r)
