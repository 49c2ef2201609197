"""`wafer serve`'s decode worker on a mesh spanning two processes (serve/decode_peers.py).

The engine's decode worker is process 0 of a 2x2 decode mesh (row 0 of the cores), and
`wafer serve-decode-peer` in a subprocess is process 1 (row 1): every decode step reduces across
the two processes, and every KV frame the decode worker lands is replayed by the peer. Greedy
outputs must equal the single-device generator's token for token, as on one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mesh.errors import WaferError
from mesh.executors import Executor
from serve.engine import check_options
from serve.events import FailReason, Mode
from serve.options import Distributed, EngineOptions
from serve.requests import Failed
from tests.helpers.workers import REPO, worker_env
from tests.test_multiprocess import needs_gloo
# The engine tests' tiny checkpoint (std 0.2 weights: decisive greedy choices) and harness.
from tests.test_serve_engine import (PROMPTS, Running, assert_done, collect, options, reference,  # noqa: F401
                                     request, sharp_checkpoint)

# Whole-run limit of the peer (join, load, compile, serve); typically 30-60 s here.
PEER_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(checkpoint: str, coordinator: str, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve-decode-peer", "--checkpoint", checkpoint, "--decode-mesh", "2x2",
             "--coordinator", coordinator, "--num-processes", "2", "--process-id", "1", "--coordinator-timeout",
             "120"], cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_peer(peer: subprocess.Popen) -> None:
    if peer.poll() is None:
        peer.kill()
    peer.wait(30)


@needs_gloo
def test_serve_decode_mesh_across_two_processes(sharp_checkpoint, reference, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    opts = dataclasses.replace(options(sharp_checkpoint, Mode.DISAGGREGATED),
                               distributed=Distributed(coordinator, 2, 0, 120))
    log = tmp_path / "peer.log"
    peer = start_peer(sharp_checkpoint, coordinator, log)
    try:
        running = Running(opts)
        try:
            site = running.engine.sites()["decode"]
            assert site.meshes == ("decode mesh 2x2 (devices, psum)",)
            assert_done(running.generate(PROMPTS[0]), reference(PROMPTS[0]))

            async def together():
                return await asyncio.gather(*(collect(running.engine, request(p)) for p in PROMPTS))
            for prompt, result in zip(PROMPTS, running.lt.run(together())):
                assert_done(result, reference(prompt))  # greedy: identical tokens, no tolerance
        finally:
            running.stop()
        # The decode worker's Shutdown closed the mesh: the peer ends by itself, cleanly.
        assert peer.wait(60) == 0, log.read_text()[-3000:]
        assert "following the decode worker" in log.read_text()
    finally:
        stop_peer(peer)


def wait_ready(running: Running, peer_log) -> None:
    """Poll until the engine's decode worker is ready again (it waits for its peer to join)."""
    deadline = time.monotonic() + PEER_TIMEOUT_S
    while not running.lt.call(running.engine.is_ready, "decode"):
        assert time.monotonic() < deadline, peer_log.read_text()[-3000:]
        time.sleep(0.2)


@needs_gloo
@pytest.mark.slow  # 40-50 s on 2 busy cores with a warm compile cache, more cold: four decode worker starts
def test_a_lost_process_fails_the_decode_worker_and_a_new_peer_brings_it_back(sharp_checkpoint, reference, tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    opts = dataclasses.replace(options(sharp_checkpoint, Mode.DISAGGREGATED),
                               distributed=Distributed(coordinator, 2, 0, 120))
    logs = [tmp_path / f"peer{i}.log" for i in range(4)]
    peers = [start_peer(sharp_checkpoint, coordinator, logs[0])]

    def new_peer():
        peers.append(start_peer(sharp_checkpoint, coordinator, logs[len(peers)]))
        wait_ready(running, logs[len(peers) - 1])

    try:
        running = Running(opts)
        try:
            assert_done(running.generate(PROMPTS[1]), reference(PROMPTS[1]))

            # The peer dies while a request decodes: the step's all-reduce across the processes fails.
            async def killed_mid_decode():
                outputs = []
                async for out in running.engine.submit(request(PROMPTS[0], 100)):
                    outputs.append(out)
                    if len(outputs) == 5:
                        peers[0].send_signal(signal.SIGKILL)
                return outputs
            end = running.lt.run(killed_mid_decode())[-1]
            assert isinstance(end, Failed) and end.reason is FailReason.WORKER_DIED, end
            peers[0].wait(30)
            # The operator starts the peer again; the engine's restarted decode worker takes it in.
            new_peer()
            assert_done(running.generate(PROMPTS[0]), reference(PROMPTS[0]))

            # The peer dies while the worker is idle: the worker's next send to it fails.
            peers[1].send_signal(signal.SIGKILL)
            peers[1].wait(30)
            tokens, end = running.generate(PROMPTS[2])
            assert isinstance(end, Failed) and end.reason is FailReason.WORKER_DIED, end

            # The other way round: the decode worker dies, its peer ends, and a new peer joins the new worker.
            new_peer()
            os.kill(running.engine.pids()["decode"], signal.SIGKILL)
            assert peers[2].wait(PEER_TIMEOUT_S) != 0
            assert "the decode worker went away" in logs[2].read_text()
            new_peer()
            assert_done(running.generate(PROMPTS[3]), reference(PROMPTS[3]))
        finally:
            running.stop()
        assert peers[3].wait(60) == 0, logs[3].read_text()[-3000:]
    finally:
        for peer in peers:
            stop_peer(peer)


@pytest.mark.parametrize("change, message", [
    (dict(distributed=Distributed("127.0.0.1:1234", 2, 1)), "decode worker is process 0"),
    (dict(distributed=Distributed("127.0.0.1:1234", 3, 0)), "does not split evenly over 3 processes"),
    (dict(distributed=Distributed("127.0.0.1", 2, 0)), "HOST:PORT"),
    (dict(mode=Mode.INTEGRATED), "needs --mode disaggregated"),
    (dict(executor=Executor.VCORES), "needs --executor devices"),
])
def test_the_engine_refuses_a_mesh_it_cannot_spread(tmp_path, change, message):
    opts = dataclasses.replace(EngineOptions(model="tiny-llama"), distributed=Distributed("127.0.0.1:1234", 2, 0))
    with pytest.raises(WaferError, match=message):
        check_options(dataclasses.replace(opts, **change))


@pytest.mark.parametrize("flags, message", [
    (["--decode-mesh", "2x2"], "needs --coordinator"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], "process 0 is the server's"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "3", "--process-id", "1"], "does not split evenly"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--checkpoint", "/no/such"],
     "checkpoint not found"),
])
def test_serve_decode_peer_refuses_bad_flags_in_one_line(capsys, flags, message):
    from tests.helpers.cli_runner import assert_one_line_error, run_cli

    rc, _, err = run_cli(capsys, "serve-decode-peer", *flags)
    assert_one_line_error(rc, err, message)
