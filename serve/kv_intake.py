"""The decode worker's side of one KV handoff: a listener of its own (so the stream on its port is
this request's and no other's), and a thread that accepts the prefill worker's connection and
reads the verified header and frames off the socket (or pulls them, for a JAX transfer) into a
queue.

The thread only does network I/O and checksum checks; the decode worker's main loop drains the
queue between decode steps (`SlotBatch.reserve` on the header, `place_layer` per frame, `commit`
at the end), so the other slots keep decoding while the stream is in flight and only one thread
ever touches the decode batch.
"""

from __future__ import annotations

import queue
import socket
import threading

from kvcache.format import KVReader
from kvcache.jax_transfer import ACK_LANDED, ACK_REFUSED, TransferReader
from kvcache.transport import KVListener
from mesh.errors import WaferError


class KVIntake:
    """One expected stream: listen, accept one sender, read header and frames into `items`.

    `items` receives ("header", KVHeader), then ("frame", LayerFrame) per layer, then ("end", None);
    or ("error", message) at the first problem. `cancel()` ends the thread promptly and closes
    every socket it opened.
    """

    def __init__(self, accept_timeout_s: float, io_timeout_s: float, jax_transfer: bool = False):
        """jax_transfer: the sender offers the cache for JAX's device-to-device transfer
        (kvcache/jax_transfer.py) instead of streaming it; the layers are pulled onto this
        process's devices and answered with one byte once all arrived."""
        self.jax_transfer = jax_transfer
        self.listener = KVListener()
        self.port = self.listener.port
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = False
        self._lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._read, args=(accept_timeout_s, io_timeout_s), daemon=True,
                                        name=f"kv-intake-{self.port}")
        self._thread.start()

    def _read(self, accept_timeout_s: float, io_timeout_s: float) -> None:
        try:
            source = self.listener.accept(accept_timeout_s, io_timeout_s)
            with source:
                with self._lock:
                    self._conn = source.sock
                    if self._cancelled:
                        return
                try:
                    reader = TransferReader(source) if self.jax_transfer else KVReader(source)
                    self.items.put(("header", reader.header))
                    for frame in reader.frames():
                        self.items.put(("frame", frame))
                except BaseException:
                    self._answer(source, ACK_REFUSED)
                    raise
                # A JAX transfer's sender keeps its arrays alive until told they were pulled.
                self._answer(source, ACK_LANDED)
                self.items.put(("end", None))
        except (WaferError, OSError) as e:
            if not self._cancelled:
                self.items.put(("error", str(e)))
        finally:
            self.listener.close()

    def _answer(self, source, ack: bytes) -> None:
        if self.jax_transfer:
            try:
                source.sock.sendall(ack)
            except OSError:
                pass  # the sender is gone already; nothing to tell it

    def cancel(self) -> None:
        """Stop reading: wake the thread from accept or recv and let it close its sockets."""
        with self._lock:
            self._cancelled = True
            for sock in (self._conn, self.listener.sock):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # not connected, or already closed

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
