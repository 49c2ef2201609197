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
import subprocess
import sys
import time

import pytest

from serve.events import Mode
from serve.options import Distributed
from serve.requests import Failed
from tests.helpers.workers import REPO, worker_env
from tests.test_multiprocess import _free_port, needs_gloo
# The engine tests' tiny checkpoint (std 0.2 weights: decisive greedy choices) and harness.
from tests.test_serve_engine import (PROMPTS, Running, assert_done, collect, options, reference,  # noqa: F401
                                     request, sharp_checkpoint)

# Whole-run limit of the peer (join, load, compile, serve); typically 30-60 s here.
PEER_TIMEOUT_S = 240


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
    coordinator = f"127.0.0.1:{_free_port()}"
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
