"""Transports for the KV-cache stream: a file, and a TCP stream between processes on 127.0.0.1.

(In memory: `format.serialize_kv` and `format.MemorySource`. JAX's device-to-device transfer:
`kvcache/jax_transfer.py`.) Every read is bounded twice: by the header's declared sizes, which
`format.parse_header` bounds before anything is allocated, and here by a timeout on every socket
operation, so a silent or vanished peer ends in a `KVStreamError`, never a hang.
"""

from __future__ import annotations

import os
import socket
import tempfile

import numpy as np

from kvcache.format import KVHeader, KVReader, KVStreamError, write_stream
from kvcache.sequence import SequenceKV
from mesh.errors import WaferError

LOOPBACK = "127.0.0.1"
# A peer that does not connect, or sends nothing, for this long is declared gone.
CONNECT_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------------- file


class _ClosesOnExit:
    """`with` support for anything with a `close()`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _FileSink:
    def __init__(self, f):
        self.f = f

    def write(self, data: memoryview) -> None:
        self.f.write(data)


def write_kv_file(seq: SequenceKV, header: KVHeader, path: str) -> int:
    """Write the stream to `path` (via a temporary file and a rename: never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".kv.tmp")
    except OSError as e:
        raise WaferError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            n = write_stream(seq, header, _FileSink(f))
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
    return n


class FileSource(_ClosesOnExit):
    """Reads a stream file: each read fills a fresh buffer the caller owns (one copy, bounded)."""

    def __init__(self, path: str):
        try:
            self.f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close() / __exit__)
        except OSError as e:
            raise WaferError(f"cannot read {path}: {e.strerror}") from None
        self.size = os.fstat(self.f.fileno()).st_size
        self.offset = 0

    def read(self, n: int) -> memoryview:
        if self.offset + n > self.size:
            raise KVStreamError(f"stream truncated: {n} bytes wanted at offset {self.offset}, "
                                f"{self.size - self.offset} left")
        buf = np.empty(n, np.uint8)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.f.readinto(view[got:])
            if not k:
                raise KVStreamError(f"stream truncated: the file ended at offset {self.offset + got}")
            got += k
        self.offset += n
        return view

    def remaining(self) -> int:
        return self.size - self.offset

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------- TCP


class _SocketSink:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def write(self, data: memoryview) -> None:
        self.sock.sendall(data)


def send_kv(seq: SequenceKV, header: KVHeader, port: int, timeout_s: float = IO_TIMEOUT_S) -> int:
    """Connect to a receiver on 127.0.0.1:`port` and stream `seq` to it; returns bytes sent."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(timeout_s)
            n = write_stream(seq, header, _SocketSink(sock))
            sock.shutdown(socket.SHUT_WR)
            # Wait for the receiver to close: its close says the whole stream was read.
            sock.recv(1)
    except TimeoutError:
        raise WaferError(f"KV send to {LOOPBACK}:{port} timed out") from None
    except OSError as e:
        raise WaferError(f"KV send to {LOOPBACK}:{port} failed: {e.strerror or e}") from None
    return n


class SocketSource(_ClosesOnExit):
    """Reads a stream from a connected socket; each read fills a fresh buffer the caller owns."""

    def __init__(self, sock: socket.socket, timeout_s: float = IO_TIMEOUT_S):
        self.sock = sock
        self.timeout_s = timeout_s
        self.offset = 0
        sock.settimeout(timeout_s)

    def read(self, n: int) -> memoryview:
        buf = np.empty(n, np.uint8)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = self.sock.recv_into(view[got:], n - got)
                if not k:
                    raise KVStreamError(f"peer disconnected after {self.offset + got} B of the stream "
                                        f"({n - got} B of the current read missing)")
                got += k
        except TimeoutError:
            raise KVStreamError(f"peer sent nothing for {self.timeout_s:g} s (after {self.offset + got} B)") from None
        except ConnectionError as e:
            raise KVStreamError(f"connection lost after {self.offset + got} B: {e.strerror or e}") from None
        self.offset += n
        return view

    def remaining(self) -> None:
        return None

    def close(self) -> None:
        self.sock.close()


class KVListener(_ClosesOnExit):
    """A listening socket on 127.0.0.1 that accepts one stream at a time."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind((LOOPBACK, port))
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise WaferError(f"cannot listen on {LOOPBACK}:{port}: {e.strerror}") from None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def accept(self, timeout_s: float = CONNECT_TIMEOUT_S, io_timeout_s: float = IO_TIMEOUT_S) -> SocketSource:
        self.sock.settimeout(timeout_s)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise KVStreamError(f"no sender connected to {LOOPBACK}:{self.port} within {timeout_s:g} s") from None
        return SocketSource(conn, io_timeout_s)

    def close(self) -> None:
        self.sock.close()


def receive_kv(landing, listener: KVListener, slot: int | None = None, timeout_s: float = CONNECT_TIMEOUT_S,
               io_timeout_s: float = IO_TIMEOUT_S, between_layers=None) -> int:
    """Accept one sender and land its stream in a slot of `landing`'s decoder; returns the slot.

    The connection is closed whatever happens; on any error the slot is given back."""
    with listener.accept(timeout_s, io_timeout_s) as source:
        return landing.land(KVReader(source), slot, between_layers)
