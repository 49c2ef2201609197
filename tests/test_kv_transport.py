"""The KV handoff between two processes on 127.0.0.1: a TCP stream and JAX's own transfer.

A worker process (tests/helpers/workers/kv_sender.py) prefills and sends; this process lands the
cache in a slot of a decode batch whose slot 0 is already decoding, and must then produce exactly
the tokens of a single-process run. A peer that disconnects or goes silent halfway, and a
JAX-transfer pull whose destination sharding differs from the source's, are refused cleanly: the
slot stays free, the other slot's state is bit-for-bit unchanged, and no socket is left open.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvcache.format import KVStreamError
from kvcache.jax_transfer import (
    TransferOffer,
    check_pull_sharding,
    receive_kv_transfer,
    send_kv_transfer,
)
from kvcache.landing import KVLanding
from kvcache.transport import KVListener, receive_kv
from mesh.axes import COL, ROW
from mesh.executors import Grid
from tests.helpers.kv_fixtures import (
    PROMPT,
    assert_state_unchanged,
    busy_decoder,
    decode_after_landing,
    decoder_state,
    export,
    solo_tokens,
    tiny,
)
from tests.helpers.workers import KV_SENDER as WORKER
from tests.helpers.workers import REPO, worker_env

# Whole-run limit of one worker (start JAX, prefill, send). Typically 4-10 s on 2 shared cores.
WORKER_TIMEOUT_S = 120


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Sender:
    """One worker process, always reaped (killed if still running when the test is done)."""

    def __init__(self, mode, model, seed, prefill_grid, port, log_dir):
        self.log = os.path.join(log_dir, f"sender-{mode}.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, WORKER, mode, model, str(seed), prefill_grid, str(port)],
                                         cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_ok(self):
        try:
            rc = self.proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sender still running after {WORKER_TIMEOUT_S} s")
        with open(self.log) as f:
            assert rc == 0, f.read()[-3000:]

    def reap(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # SIGKILLed and still not reaped: nothing more a test can do


@pytest.fixture
def senders(tmp_path):
    started = []

    def start(mode, port, model="tiny-qwen2", seed=3, prefill_grid="1x1"):
        started.append(Sender(mode, model, seed, prefill_grid, port, str(tmp_path)))
        return started[-1]

    yield start
    for s in started:
        s.reap()


@pytest.mark.parametrize("model, prefill, decode", [
    ("tiny-qwen2", "1x1", "2x2"), pytest.param("tiny-llama", "1x2", "3x3", marks=pytest.mark.slow)])
def test_tcp_between_processes_decodes_exactly(senders, model, prefill, decode):
    params, config = tiny(model)
    dec = busy_decoder(params, config, decode)
    with KVListener() as listener:
        sender = senders("tcp", listener.port, model, prefill_grid=prefill)
        slot = receive_kv(KVLanding(dec), listener, timeout_s=WORKER_TIMEOUT_S)
    sender.wait_ok()
    assert decode_after_landing(dec, slot, dec.tokens[slot]) == solo_tokens(params, config, PROMPT)


@pytest.mark.slow  # 15-60 s: both processes load SmolLM2, the receiver compiles its 30-layer mesh step
@pytest.mark.parametrize("mode", ["tcp", "jax"])
def test_smollm2_between_processes_decodes_exactly(senders, smollm2, mode):
    params, config = smollm2.params, smollm2.config
    dec = busy_decoder(params, config, "2x2")
    receive = receive_kv if mode == "tcp" else receive_kv_transfer
    with KVListener() as listener:
        sender = senders(mode, listener.port, "smollm2-135m", prefill_grid="1x2")
        slot = receive(KVLanding(dec), listener, timeout_s=WORKER_TIMEOUT_S)
    sender.wait_ok()
    want = solo_tokens(params, config, PROMPT)
    assert len(set(want)) > 5
    assert decode_after_landing(dec, slot, dec.tokens[slot]) == want


@pytest.mark.parametrize("mode, message", [("tcp-half", "peer disconnected after"),
                                           ("tcp-stall", "peer sent nothing for 3 s")])
def test_a_peer_that_stops_halfway_is_refused_cleanly(senders, mode, message):
    params, config = tiny("tiny-qwen2")
    dec = busy_decoder(params, config)
    landing = KVLanding(dec)
    before, fds = decoder_state(dec), _open_fds()
    with KVListener() as listener:
        senders(mode, listener.port)
        with pytest.raises(KVStreamError, match=message):
            receive_kv(landing, listener, timeout_s=WORKER_TIMEOUT_S, io_timeout_s=3)
    assert_state_unchanged(before, dec)
    assert dec.free_slots() == [1] and not dec._landing
    assert _open_fds() == fds  # the listener and the accepted connection are both closed


def test_jax_transfer_between_processes_decodes_exactly(senders):
    params, config = tiny("tiny-llama")
    dec = busy_decoder(params, config, "3x3")
    with KVListener() as listener:
        sender = senders("jax", listener.port, "tiny-llama", prefill_grid="1x2")
        slot = receive_kv_transfer(KVLanding(dec), listener, timeout_s=WORKER_TIMEOUT_S)
    sender.wait_ok()
    assert decode_after_landing(dec, slot, dec.tokens[slot]) == solo_tokens(params, config, PROMPT)


def test_jax_transfer_refuses_a_destination_sharded_unlike_the_source():
    """Sender (a thread) offers a cache laid out over 2 prefill devices; the receiver asks to pull it
    split over the head dimension instead: refused before any pull, slot free, the sender told so."""
    params, config = tiny("tiny-qwen2")
    seq, header = export(params, config, prefill_grid=Grid(1, 2))
    dec = busy_decoder(params, config)
    before = decoder_state(dec)
    mesh = Mesh(np.array(jax.devices()[4:6]).reshape(1, 2), (ROW, COL))
    wrong = NamedSharding(mesh, P(None, None, COL))  # two shards of [2, 9, 8], as the source's [1, 9, 16]
    answers = []
    with KVListener() as listener:
        thread = threading.Thread(target=lambda: answers.append(send_kv_transfer(seq, header, listener.port)))
        thread.start()
        try:
            with pytest.raises(KVStreamError, match="JAX transfer refused: destination shards"):
                receive_kv_transfer(KVLanding(dec), listener, destination=wrong)
        finally:
            thread.join(timeout=60)
    assert answers == [False]
    assert_state_unchanged(before, dec)
    assert dec.free_slots() == [1]


def test_pull_guard_compares_every_shard():
    """The case that returns wrong data silently: same shard count and size, other index map."""
    shape = (4, 6, 8)
    devices = jax.devices()[:2]
    by_cols = NamedSharding(Mesh(np.array(devices).reshape(1, 2), (ROW, COL)), P(None, COL))
    by_rows = NamedSharding(Mesh(np.array(devices).reshape(2, 1), (ROW, COL)), P(ROW))
    from kvcache.jax_transfer import shard_index_map
    source = shard_index_map(by_cols, shape)
    assert source == [[[0, 4], [0, 3], [0, 8]], [[0, 4], [3, 6], [0, 8]]]
    check_pull_sharding(list(shape), "float32", source, jax.ShapeDtypeStruct(shape, np.float32, sharding=by_cols))
    for dest, message in [(jax.ShapeDtypeStruct(shape, np.float32, sharding=by_rows), "destination shards"),
                          (jax.ShapeDtypeStruct(shape, np.float16, sharding=by_cols), "float16"),
                          (jax.ShapeDtypeStruct((4, 6, 9), np.float32, sharding=by_cols), r"\[4, 6, 9\]")]:
        with pytest.raises(KVStreamError, match=message):
            check_pull_sharding(list(shape), "float32", source, dest)


@pytest.mark.parametrize("on_devices", [True, False])
def test_transfer_offer_describes_the_prefill_layout(on_devices):
    """Offered shards are the prefill layout's columns, whether the cache is on the prefill mesh's
    devices already or on the host in the prefill layout."""
    import dataclasses
    params, config = tiny("tiny-qwen2")
    seq, header = export(params, config, prefill_grid=Grid(1, 2))
    if not on_devices:
        seq = dataclasses.replace(seq, k_LKSH=tuple(np.asarray(a) for a in seq.k_LKSH),
                                  v_LKSH=tuple(np.asarray(a) for a in seq.v_LKSH))
    offer = TransferOffer(seq, header)
    assert offer.block["shards"] == [[[0, 1], [0, len(PROMPT)], [0, 16]], [[1, 2], [0, len(PROMPT)], [0, 16]]]
    assert offer.block["address"].startswith("127.0.0.1:")
    assert len(offer.block["checksums"]) == config.n_layers
