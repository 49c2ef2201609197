"""The KV-cache handoff over JAX's own device-to-device transfer (`jax.experimental.transfer`).

The sender offers each layer's K and V, as they lie on the prefill mesh, to a transfer server
(`await_pull`), and tells the receiver what it offers over a TCP control connection: the usual
stream header (model, shapes, layout), then a transfer block (server address, uuids, the arrays'
global shape, dtype and per-shard index map, and each layer's frame checksum). The receiver pulls
layer by layer into its own devices, checks each layer's checksum, and places it in its slot
(resharding to the decode layout locally); then it answers one byte: 1 landed, 0 refused.

The guard. In jax 0.10.2 a pull whose destination sharding differs per shard from the source's
returns wrong data with no error (on CPU, between processes on 127.0.0.1: a [4, 6, 8] array
split over dim 1 pulled as split over dim 0 came back reinterpreted). So the receiver pulls only
into a sharding whose per-shard index map is exactly the source's, as described in the
transfer block, and refuses anything else before issuing a pull; it reshards after the pull.

Bounded waits: a pull's own `timeout` did not bound a pull that is never served (it hung), so
the receiver polls for readiness up to a deadline, then poisons the connection, which fails the
outstanding pulls with an error, and refuses the stream.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import time
from collections.abc import Iterator

import jax
import numpy as np
import xxhash
from jax.experimental import transfer
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from kvcache.format import (
    CHECKSUM,
    MAX_HEADER_BYTES,
    KVHeader,
    KVStreamError,
    LayerFrame,
    checksum_of_pieces,
    frame_checksum,
    parse_header,
    read_json_block,
)
from kvcache.sequence import SequenceKV, place_on_prefill_mesh
from kvcache.transport import (
    CONNECT_TIMEOUT_S,
    IO_TIMEOUT_S,
    LOOPBACK,
    KVListener,
    SocketSource,
)
from mesh.axes import COL, ROW
from mesh.errors import WaferError
from mesh.executors import Grid

BLOCK_LEN = struct.Struct("<I")
TRANSFER_KEYS = {"address", "uuid", "shape", "dtype", "shards", "checksums"}
ACK_LANDED, ACK_REFUSED = b"\x01", b"\x00"
# Seconds a pulled layer may take before the pull is declared lost.
PULL_TIMEOUT_S = 60.0


def start_server():
    """A transfer server on 127.0.0.1 (an ephemeral port), for this process's CPU/GPU client."""
    return transfer.start_transfer_server(jax.devices()[0].client, f"{LOOPBACK}:0", [f"{LOOPBACK}:0"])


def shard_index_map(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> list[list[list[int]]]:
    """Per shard, in the order the transfer pairs shards (the sharding's device order), the
    [start, stop) of every dimension."""
    if isinstance(sharding, NamedSharding):
        devices = list(sharding.mesh.devices.flat)
    elif isinstance(sharding, SingleDeviceSharding):
        devices = list(sharding.device_set)
    else:
        raise WaferError(f"JAX transfer: unsupported sharding {type(sharding).__name__}")
    index = sharding.devices_indices_map(shape)
    out = []
    for d in devices:
        out.append([[s.start or 0, shape[i] if s.stop is None else s.stop] for i, s in enumerate(index[d])])
    return out


def check_pull_sharding(source_shape, source_dtype: str, source_shards, dest: jax.ShapeDtypeStruct) -> None:
    """Refuse a pull whose destination is not exactly the source's shape, dtype and per-shard map
    (the transfer would otherwise return wrong data silently)."""
    if list(dest.shape) != list(source_shape) or np.dtype(dest.dtype).name != source_dtype:
        raise KVStreamError(f"JAX transfer refused: destination {list(dest.shape)} {np.dtype(dest.dtype).name}, "
                            f"source {list(source_shape)} {source_dtype}")
    try:
        dest_shards = shard_index_map(dest.sharding, tuple(dest.shape))
    except ValueError as e:  # e.g. a dimension the destination mesh does not divide
        raise KVStreamError(f"JAX transfer refused: destination sharding cannot hold the source: "
                            f"{str(e).splitlines()[0]}") from None
    if dest_shards != source_shards:
        raise KVStreamError(f"JAX transfer refused: destination shards {dest_shards} differ from the source's "
                            f"{source_shards}; such a pull returns wrong data without an error")


def _device_arrays(seq: SequenceKV, layer: int) -> list[jax.Array]:
    """Layer `layer`'s K and V on devices in the prefill layout (host arrays are placed on this
    process's devices first), so the shards offered are the layout's columns."""
    out = []
    for a in (seq.k_LKSH[layer], seq.v_LKSH[layer]):
        if not isinstance(a, jax.Array):
            grid = seq.layout.grid
            local = Grid(1, grid.cols)  # one row of the prefill mesh: this sequence's
            layout = dataclasses.replace(seq.layout, grid=local, row=0)
            a = place_on_prefill_mesh(np.asarray(a), layout, jax.local_devices())
        out.append(a)
    return out


class TransferOffer:
    """Offers `seq` on a transfer server and describes the offer (sender side)."""

    def __init__(self, seq: SequenceKV, header: KVHeader, server=None, uuid: int | None = None):
        if header.dtype != seq.dtype.name:
            raise WaferError(f"JAX transfer sends the cache's own dtype ({seq.dtype.name}), not {header.dtype}")
        self.server = server or start_server()
        self.uuid = uuid if uuid is not None else int.from_bytes(np.random.default_rng().bytes(6), "little") << 12
        self.arrays = [_device_arrays(seq, layer) for layer in range(seq.n_layers)]
        for layer, pair in enumerate(self.arrays):
            self.server.await_pull(self.uuid + layer, pair)
        a = self.arrays[0][0]
        self.header = header
        self.block = {"address": self.server.address(), "uuid": self.uuid, "shape": list(a.shape),
                      "dtype": np.dtype(a.dtype).name, "shards": shard_index_map(a.sharding, a.shape),
                      "checksums": [f"{frame_checksum(seq, header, layer):016x}" for layer in range(seq.n_layers)]}

    def describe(self) -> bytes:
        """The control message: stream header, then the transfer block (length, JSON, checksum)."""
        text = json.dumps(self.block, separators=(",", ":")).encode()
        block = BLOCK_LEN.pack(len(text)) + text
        return self.header.encode() + block + CHECKSUM.pack(xxhash.xxh3_64_intdigest(block))


def send_kv_transfer(seq: SequenceKV, header: KVHeader, port: int, timeout_s: float = PULL_TIMEOUT_S) -> bool:
    """Offer `seq` for pulling and tell the receiver on 127.0.0.1:`port`; True if it landed."""
    offer = TransferOffer(seq, header)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(offer.describe())
            # The arrays must stay alive until the receiver has pulled them: wait for its answer.
            return sock.recv(1) == ACK_LANDED
    except TimeoutError:
        raise WaferError(f"JAX transfer to {LOOPBACK}:{port}: no answer within {timeout_s:g} s") from None
    except OSError as e:
        raise WaferError(f"JAX transfer to {LOOPBACK}:{port} failed: {e.strerror or e}") from None


def _read_block(source: SocketSource) -> dict:
    (length,) = BLOCK_LEN.unpack(bytes(source.read(BLOCK_LEN.size)))
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise KVStreamError(f"transfer block size {length} B is outside [2, {MAX_HEADER_BYTES}]")
    return read_json_block(source, BLOCK_LEN.pack(length), length, "transfer block", TRANSFER_KEYS)


def _check_block(d: dict, header: KVHeader) -> None:
    layout = header.layout
    host, _, port = str(d["address"]).rpartition(":")
    if host != LOOPBACK or not port.isdigit():
        raise KVStreamError(f"transfer server {d['address']!r} is not on {LOOPBACK}")
    if not isinstance(d["uuid"], int) or isinstance(d["uuid"], bool) or not 0 <= d["uuid"] < 1 << 62:
        raise KVStreamError(f"transfer uuid {d['uuid']!r} is not a non-negative integer")
    shape = [layout.padded_heads, header.tokens, header.head_dim]
    if d["shape"] != shape or d["dtype"] != header.dtype:
        raise KVStreamError(f"layout mismatch: transfer arrays {d['shape']} {d['dtype']}, the header says "
                            f"{shape} {header.dtype}")
    # The prefill layout's own shard map: column c holds KV heads [c kc, (c + 1) kc).
    kc = layout.kc
    want = [[[c * kc, (c + 1) * kc], [0, header.tokens], [0, header.head_dim]] for c in range(layout.grid.cols)]
    if d["shards"] != want:
        raise KVStreamError(f"layout mismatch: transfer shards {d['shards']} are not the prefill layout's {want}")
    sums = d["checksums"]
    if not isinstance(sums, list) or len(sums) != header.layers or not all(isinstance(s, str) for s in sums):
        raise KVStreamError(f"transfer block needs {header.layers} layer checksums")


def destination_sharding(header: KVHeader, devices: list | None = None) -> NamedSharding:
    """The receiver's own sharding for the pull: the prefill layout (KV heads over C columns) on
    C local devices, so the per-shard index map equals the source's."""
    cols = header.layout.grid.cols
    devices = list(jax.local_devices() if devices is None else devices)
    if len(devices) < cols:
        raise KVStreamError(f"JAX transfer needs {cols} local devices to mirror the source's shards, "
                            f"{len(devices)} available")
    mesh = Mesh(np.array(devices[:cols], dtype=object).reshape(1, cols), (ROW, COL))
    return NamedSharding(mesh, P(COL, None, None))


def _wait(arrays: list[jax.Array], conn, deadline: float, layer: int, timeout_s: float) -> None:
    while not all(a.is_ready() for a in arrays):
        if time.monotonic() > deadline:
            conn._poison_connection()  # fails the outstanding pulls instead of leaving them hanging
            raise KVStreamError(f"JAX transfer: layer {layer} did not arrive within {timeout_s:g} s")
        time.sleep(0.001)
    try:
        jax.block_until_ready(arrays)
    except jax.errors.JaxRuntimeError as e:
        raise KVStreamError(f"JAX transfer of layer {layer} failed: {str(e).splitlines()[0]}") from None


def _logical_host(a: jax.Array, header: KVHeader) -> list[np.ndarray]:
    by_start = {s.index[0].start or 0: s for s in a.addressable_shards}
    shards = [np.asarray(by_start[c * header.layout.kc].data) for c in range(header.layout.grid.cols)]
    return list(header.layout.logical_pieces(shards))


class TransferReader:
    """The receiving side of one offer: header, transfer block and guard at once, then `frames()`
    pulls every layer (all pulls issued together), verifies it and yields it as a `LayerFrame`."""

    def __init__(self, source: SocketSource, destination: jax.sharding.Sharding | None = None,
                 pull_timeout_s: float = PULL_TIMEOUT_S):
        self.header = parse_header(source)
        self.block = _read_block(source)
        _check_block(self.block, self.header)
        self.dest = jax.ShapeDtypeStruct(tuple(self.block["shape"]), np.dtype(self.header.np_dtype),
                                         sharding=destination or destination_sharding(self.header))
        check_pull_sharding(self.block["shape"], self.block["dtype"], self.block["shards"], self.dest)
        self.pull_timeout_s = pull_timeout_s

    def frames(self) -> Iterator[LayerFrame]:
        header, block = self.header, self.block
        conn = start_server().connect(block["address"])
        done = False
        try:
            # Every pull is issued at once: layer l is placed while later layers are in flight.
            pulls = [conn.pull(block["uuid"] + layer, [self.dest, self.dest]) for layer in range(header.layers)]
            deadline = time.monotonic() + self.pull_timeout_s
            for layer, pair in enumerate(pulls):
                _wait(pair, conn, deadline, layer, self.pull_timeout_s)
                k_parts, v_parts = (_logical_host(a, header) for a in pair)
                checksum = checksum_of_pieces(header, layer, k_parts + v_parts)
                if f"{checksum:016x}" != block["checksums"][layer]:
                    raise KVStreamError(f"layer {layer}: checksum mismatch after the JAX transfer")
                yield LayerFrame(layer, _join(k_parts), _join(v_parts), checksum)
            done = True
        finally:
            if not done:  # an error, or a consumer that stopped early: fail the outstanding pulls
                conn._poison_connection()


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def receive_kv_transfer(landing, listener: KVListener, slot: int | None = None,
                        destination: jax.sharding.Sharding | None = None, timeout_s: float = CONNECT_TIMEOUT_S,
                        pull_timeout_s: float = PULL_TIMEOUT_S) -> int:
    """Accept one sender's offer and pull it, layer by layer, into a slot of `landing`'s decoder.

    destination: the sharding to pull into (default: `destination_sharding`); one that differs
    from the source's per shard is refused before any pull. Returns the slot.
    """
    with listener.accept(timeout_s, IO_TIMEOUT_S) as source:
        try:
            slot = landing.land(TransferReader(source, destination, pull_timeout_s), slot)
        except BaseException:
            try:
                source.sock.sendall(ACK_REFUSED)
            except OSError:
                pass  # the sender is gone already; nothing to tell it
            raise
        source.sock.sendall(ACK_LANDED)
        return slot
