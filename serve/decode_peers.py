"""A decode worker whose mesh spans processes: process 0 leads, the other processes follow.

With `EngineOptions.distributed`, the decode worker is process 0 of a `jax.distributed` mesh
(mesh/distributed.py) and the operator starts processes 1..N-1 on other hosts
(`wafer serve-decode-peer`). A program over a mesh that spans processes runs only when every
process dispatches it, in the same order, with the same host data. So process 0 sends every
operation it runs on its `SlotBatch` (reserve, place_layer, commit, abort, evict, insert, step),
with its arguments (the KV frames it lands included), to every peer before running it itself; each
peer replays the same calls on its own `SlotBatch`, holding the same host state, and so raises the
same WaferError where process 0 does (an occupied slot, a bad length) and dispatches the same
programs otherwise.

The stream is one TCP connection from process 0 to each peer, length-prefixed pickles, process 0
writing and the peers reading (trusted hosts only: it is a pickle stream, as JAX's own processes
trust each other). Why not `multihost_utils.broadcast_one_to_all` for every operation: each call is
a collective program of its own shape, compiled per frame size, and slow. Measured between two
processes on this 2-CPU machine (gloo over 127.0.0.1), one SmolLM2 KV layer of 64 / 512 positions:
broadcast_one_to_all of K alone, median 5.2 / 8.1 ms (92-317 ms for a new shape); this stream, K
and V together plus a 1-byte ack, 0.19 / 0.40 ms round trip. And a broadcast leaves a peer no way
to tell a silent process 0 from an idle one. It carries one value here: the port of process 0's
listener, right after the processes join.

Setup, in order: every process joins the mesh; process 0 listens on the coordinator's host and
broadcasts the port; each peer connects and says which process it is; process 0 sends each peer its
`WorkerSpec` (slots, max_len, schedule: the peers take them from the server) and the model's
fingerprint; each peer loads its own copy of the model, refuses one with another fingerprint,
builds and compiles the same `SlotBatch` and answers ready. Then the replay.

Failures: a peer that dies or stops reading fails process 0's next send (`PeerLost`, not a
WaferError, so it is never mistaken for one request's refused KV stream): the decode worker exits,
and the engine restarts it, which waits for the peers to join again. A peer whose process 0 has
gone (its stream ends, or stays silent past `PEER_SILENCE_S` though process 0 pings every
`PING_S`) ends with a WaferError. Peers are not restarted by anything here: `wafer serve-decode-peer`
is started again by the operator (or a supervisor) whenever it ends.
"""

from __future__ import annotations

import dataclasses
import pickle
import socket
import struct
import threading
import time

import numpy as np

from kvcache.sequence import model_fingerprint
from mesh.distributed import split_address
from mesh.errors import WaferError
from model.dtypes import resolve_dtype
from model.load import LoadedModel
from model.slot_batch import SlotBatch
from model.weights import params_dtype

# Every process 0 waits this long for each peer to connect, and then to build its batch (loading
# and compiling included: tens of seconds for SmolLM2 on a busy CPU).
PEER_START_TIMEOUT_S = 600.0
# A send that cannot finish this long means the peer is dead or hung.
SEND_TIMEOUT_S = 60.0
# Process 0 pings an idle stream this often; a peer that hears nothing for PEER_SILENCE_S gives up.
PING_S = 5.0
PEER_SILENCE_S = 60.0

_LEN = struct.Struct("!Q")

# The SlotBatch methods that place data on the mesh or run a program over it, replayed by the peers.
SPMD_OPS = frozenset({"reserve", "place_layer", "commit", "abort", "evict", "insert", "step"})


class PeerLost(RuntimeError):
    """A peer of the decode mesh is gone: the mesh cannot run another program."""


@dataclasses.dataclass(frozen=True)
class Hello:
    """What process 0 tells each peer once it connected."""

    spec: object  # serve.worker_spec.WorkerSpec of the decode worker
    fingerprint: str  # kvcache.sequence.model_fingerprint of process 0's model


def _send(sock: socket.socket, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket):
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n))


def _share_port(port: int) -> int:
    """Process 0's listener port, from process 0 to every process (a collective: all call it)."""
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(port)))


class PeerLink:
    """Process 0's end: a stream to every peer, in process order."""

    def __init__(self, socks: list[socket.socket]):
        self.socks = socks
        self._lock = threading.Lock()  # the pinger sends too
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, daemon=True, name="decode-peer-ping")

    @classmethod
    def open(cls, distributed, spec, fingerprint: str, timeout_s: float = PEER_START_TIMEOUT_S) -> "PeerLink":
        """Listen on the coordinator's host, tell the peers where, accept each, send it `Hello`.
        Call right after this process joined the mesh: the peers wait in the same collective."""
        host, _ = split_address(distributed.coordinator)
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        socks: dict[int, socket.socket] = {}
        try:
            _share_port(listener.getsockname()[1])
            deadline = time.monotonic() + timeout_s
            while len(socks) < distributed.num_processes - 1:
                listener.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    raise PeerLost(f"{distributed.num_processes - 1 - len(socks)} decode peer(s) did not connect "
                                   f"within {timeout_s:g} s") from None
                sock.settimeout(SEND_TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                process_id = _recv(sock)
                if not isinstance(process_id, int) or not 0 < process_id < distributed.num_processes \
                        or process_id in socks:
                    sock.close()
                    raise PeerLost(f"a decode peer said it is process {process_id!r}: expected one of "
                                   f"1..{distributed.num_processes - 1}, each once")
                socks[process_id] = sock
                _send(sock, Hello(spec, fingerprint))
        except (OSError, EOFError) as e:
            for s in socks.values():
                s.close()
            raise PeerLost(f"a decode peer failed while joining: {e!r}") from None
        finally:
            listener.close()
        return cls([socks[i] for i in sorted(socks)])

    def wait_ready(self, timeout_s: float = PEER_START_TIMEOUT_S) -> None:
        """Wait for every peer to have built its batch; a peer that could not fails the worker."""
        for i, sock in enumerate(self.socks, start=1):
            sock.settimeout(timeout_s)
            try:
                answer = _recv(sock)
            except (OSError, EOFError) as e:
                raise PeerLost(f"decode peer {i} ended before it was ready ({e!r})") from None
            finally:
                sock.settimeout(SEND_TIMEOUT_S)
            if answer != "ready":
                raise PeerLost(f"decode peer {i}: {answer}")
        self._pinger.start()

    def send(self, message) -> None:
        with self._lock:
            for i, sock in enumerate(self.socks, start=1):
                try:
                    _send(sock, message)
                except OSError as e:
                    raise PeerLost(f"decode peer {i} is gone ({e!r}); restart it with wafer serve-decode-peer") \
                        from None
            self._last_send = time.monotonic()

    def _ping_loop(self) -> None:
        while not self._closed.wait(PING_S / 2):
            if time.monotonic() - self._last_send >= PING_S:
                try:
                    self.send(("ping", ()))
                except PeerLost:
                    return  # the next operation fails the worker

    def close(self) -> None:
        """Tell the peers the worker stops (best effort: a dead one is already gone)."""
        self._closed.set()
        try:
            self.send(("close", ()))
        except PeerLost:
            pass
        for sock in self.socks:
            sock.close()


class LeaderSlotBatch:
    """A `SlotBatch` whose SPMD operations are sent to the peers before they run here; anything
    else (reads of its state, its plan) is the batch's own."""

    def __init__(self, batch: SlotBatch, link: PeerLink):
        self._batch, self._link = batch, link

    def __getattr__(self, name):
        if name in SPMD_OPS:
            def forwarded(*args):
                self._link.send((name, args))
                return getattr(self._batch, name)(*args)
            return forwarded
        return getattr(self._batch, name)


def follow(process_id: int, coordinator: str, grid, load, build_batch, on_status=lambda message: None) -> None:
    """A peer of the decode mesh, after it joined: replay process 0's operations until it closes.

    Args:
      process_id: this process (1..N-1).
      coordinator: the mesh's HOST:PORT (process 0's listener is on the same host).
      grid: the decode mesh this process joined for (`mesh.executors.Grid`); the server's must match.
      load: () -> LoadedModel, this host's copy of the model.
      build_batch: (LoadedModel, WorkerSpec) -> SlotBatch, compiled; the decode worker's own recipe.
      on_status: called with a line at each stage (the CLI prints it).

    Raises:
      WaferError: process 0 went away, or this process cannot join it (another model, another mesh).
    """
    host, _ = split_address(coordinator)
    port = _share_port(0)
    try:
        sock = socket.create_connection((host, port), timeout=PEER_START_TIMEOUT_S)
    except OSError as e:
        raise WaferError(f"cannot reach the decode worker at {host}:{port}: {e}") from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _send(sock, process_id)
            hello: Hello = _recv(sock)
        except (OSError, EOFError) as e:
            raise WaferError(f"the decode worker at {host}:{port} went away while this peer joined ({e!r})") from None
        theirs = hello.spec.options.decode_grid
        if theirs != grid:
            _send(sock, f"process {process_id} was started for a {grid} decode mesh, the server's is {theirs}")
            raise WaferError(f"the server's decode mesh is {theirs}, this peer's --decode-mesh {grid}")
        loaded: LoadedModel = load()
        if model_fingerprint(loaded.config, loaded.params) != hello.fingerprint:
            _send(sock, f"process {process_id} loaded another model than the server's")
            raise WaferError("this model differs from the server's (fingerprints differ): load the same checkpoint")
        theirs_dtype, ours_dtype = resolve_dtype(hello.spec.options.dtype), params_dtype(loaded.params)
        if ours_dtype != theirs_dtype:
            _send(sock, f"process {process_id} loaded the model in {ours_dtype.name}, the server's is "
                        f"{theirs_dtype.name}")
            raise WaferError(f"the server decodes in {theirs_dtype.name}, this peer loaded {ours_dtype.name}: "
                             f"pass --dtype {theirs_dtype.name}")
        on_status(f"process {process_id}: building the decode batch of {hello.spec.options.scheduler.slots} slots")
        batch = build_batch(loaded, hello.spec)
        _send(sock, "ready")
        on_status(f"process {process_id}: following the decode worker")
        sock.settimeout(PEER_SILENCE_S)
        ops = 0
        while True:
            try:
                name, args = _recv(sock)
            except TimeoutError:
                raise WaferError(f"the decode worker said nothing for {PEER_SILENCE_S:g} s") from None
            except (OSError, EOFError):
                raise WaferError(f"the decode worker went away after {ops} operations (restart this peer once "
                                 "the server's decode worker is back)") from None
            if name == "close":
                return
            if name == "ping":
                continue
            if name not in SPMD_OPS:
                raise WaferError(f"the decode worker sent an unknown operation {name!r}")
            ops += 1
            try:
                getattr(batch, name)(*args)
            except WaferError:
                pass  # process 0 raised the same on the same state, and reports it to the engine
