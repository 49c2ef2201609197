"""The worker processes' programs: the prefill worker, the decode worker, and the integrated one.

Each runs one loop: apply the engine's commands in order (serve/worker_messages.py), and between
two commands do what is pending (land the frames of KV streams in flight). Only the loop's thread
touches the meshes; the threads it starts do network I/O only (sending a cache, reading one).

- Prefill (disaggregated): prefills batches on the prefill mesh and keeps each request's cache
  (`SequenceKV`, still on the prefill devices) until it is shipped to the decode worker over TCP
  (`kvcache.transport.send_kv`, checksummed format), or offered for JAX's device-to-device
  transfer (`kvcache.jax_transfer`, transport "jax"), or discarded.
- Decode (disaggregated): the wafer decode mesh's `SlotBatch`. For each placement it opens a
  listener of its own, reserves the slot when the stream's header passes the landing check, places
  each verified layer between decode steps and commits at the end; a refused or broken stream
  aborts the reservation and leaves the other slots as they were.
- Integrated: both meshes in one process; a prefill batch runs between two decode steps and its
  caches go straight into their slots (`SlotBatch.insert`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time

import numpy as np

from kvcache.format import KVStreamError, convert_frame, header_for
from kvcache.jax_transfer import send_kv_transfer
from kvcache.landing import KVLanding
from kvcache.sequence import model_fingerprint, sequence_from_prefill
from kernels.allreduce import Schedule
from kernels.schedule_choice import fastest_schedule
from kvcache.transport import IO_TIMEOUT_S, send_kv
from mesh.errors import WaferError
from mesh.executors import Executor, make_core_mesh
from mesh.wafer import emulated_spec
from model.load import LoadedModel, load_model
from model.prefill import Prefiller
from model.sampling import Sampling
from model.slot_batch import SlotBatch
from model.wafer_decode import MeshOptions
from serve.decode_peers import LeaderSlotBatch, PeerLink
from serve.kv_intake import KVIntake
from serve.worker_messages import (Discard, Evict, Expect, Landed, LandFailed, Listening, PrefillBatch, PrefillReport,
                                   Ready, Ship, ShipFailed, Shipped, Shutdown, SramUse, Step, StepReport,
                                   WorkerSite)
from serve.worker_spec import Role, WorkerSpec

# How long the loop waits for a command when nothing else is pending, and when a KV stream is in
# flight (its frames are placed between commands, so the wait bounds their latency).
IDLE_POLL_S = 1.0
LANDING_POLL_S = 0.002
# A worker shutting down waits this long for the precompiling thread to finish its program (then
# leaves without it: worker_process.worker_main).
PRECOMPILE_JOIN_S = 5.0
PRECOMPILE_THREAD = "prefill-precompile"
# A listener outlives the handoff deadline by this much, so the scheduler's deadline fires first.
ACCEPT_GRACE_S = 5.0

log = logging.getLogger(__name__)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Channel:
    """The worker's end of the pipe; sends are locked (the prefill worker's ship thread sends too)."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, report) -> None:
        with self._lock:
            self.conn.send(report)


def run_worker(spec: WorkerSpec, conn) -> None:
    """Load the model, build the worker of `spec.role`, report Ready, then serve until Shutdown."""
    opts = spec.options
    loaded = load_model(opts.model, opts.checkpoint, dtype=opts.dtype)
    channel = Channel(conn)
    worker = {Role.PREFILL: PrefillWorker, Role.DECODE: DecodeWorker,
              Role.INTEGRATED: IntegratedWorker}[spec.role](loaded, spec, channel)
    channel.send(Ready(loaded.config, worker.capacity, worker_site(spec, worker)))
    precompiler = getattr(worker, "precompiler", None)
    try:
        while True:
            if conn.poll(worker.poll_timeout()):
                if precompiler is not None:
                    precompiler.busy()
                command = conn.recv()
                if isinstance(command, Shutdown):
                    break
                worker.apply(command)
            elif precompiler is not None:
                precompiler.idle()
            worker.between_commands()
    finally:
        worker.close()


def worker_site(spec: WorkerSpec, worker) -> WorkerSite:
    """This process, its CPUs, its meshes and (with a decode batch) its cores' SRAM plan."""
    opts = spec.options
    meshes, sram = [], None
    if spec.role is not Role.DECODE:
        meshes.append(f"prefill mesh {opts.prefill_grid} (devices)")
    if spec.role is not Role.PREFILL:
        schedule = worker.slots.batch.opts.schedule  # what --schedule auto chose, or the named one
        meshes.append(f"decode mesh {opts.decode_grid} ({opts.executor.value}, {schedule.value})")
        plan = worker.slots.batch.plan
        sram = SramUse(plan.per_core_bytes, opts.sram_budget,
                       tuple((k, b) for k, b in plan.bytes_by_kind().items() if b))
    return WorkerSite(os.getpid(), tuple(sorted(os.sched_getaffinity(0))), tuple(meshes), sram)


def prefill_batch_sizes(spec: WorkerSpec) -> tuple[int, ...]:
    """The batch sizes the worker prefills: powers of two (`_prefill` pads to one) up to the
    largest batch the scheduler sends (a prefill batch, capped by the free slots in integrated
    mode and by the caches the prefill side may hold in disaggregated mode)."""
    sched = spec.options.scheduler
    cap = sched.slots if spec.role is Role.INTEGRATED else sched.max_prefilled
    most = min(sched.max_prefill_batch, cap)
    return tuple(1 << i for i in range((most - 1).bit_length() + 1))


class Precompiler:
    """Compiles the prefill program of every prompt-length bucket up to the longest prompt a slot
    can take (`--max-len` - 1), for every batch size, on a thread of its own, batch size 1 first
    and shortest prompts first, one program at a time while the worker is idle.

    Without it the first prompt of each new 32-token bucket (and of each batch size) compiled
    mid-serve: seconds on a CPU, on the critical path of every request behind it. Compiling all
    of them before reporting Ready would delay the start by minutes for a long `--max-len` (about
    6 s per program for SmolLM2 on one CPU, 3 s from XLA's persistent cache), so the worker
    serves at once and the programs appear in its idle time (the worker's loop says when it is:
    `idle`, `busy`). A program being compiled when a command arrives is finished, at the same
    priority (a lower one would let the worker's loop wait on the GIL behind a starved thread).
    A request needing a program not compiled yet compiles it (or waits for this thread's
    compilation of it), as before; an integrated worker that never idles compiles on demand.
    """

    def __init__(self, prefiller: Prefiller, max_prompt_len: int, batch_sizes: tuple[int, ...]):
        self.prefiller, self.max_prompt_len, self.batch_sizes = prefiller, max_prompt_len, batch_sizes
        self._stop, self._idle = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=PRECOMPILE_THREAD)
        self._thread.start()

    def idle(self) -> None:
        self._idle.set()

    def busy(self) -> None:
        self._idle.clear()

    def _go_on(self) -> bool:
        while not self._stop.is_set():
            if self._idle.wait(IDLE_POLL_S):
                return True
        return False

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            for b in self.batch_sizes:
                n = self.prefiller.precompile(self.max_prompt_len, (b,), self._go_on)
                if self._stop.is_set():
                    return
                log.info("prefill programs for batches of %d, prompts up to %d tokens: %d compiled, %.1f s "
                         "since start", b, self.max_prompt_len, n, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 (a request needing the program compiles it, and reports)
            log.warning("prefill precompilation stopped: %s", one_line(e))

    def close(self) -> None:
        """Stop after the program being compiled (a worker shutting down waits for at most one)."""
        self._stop.set()
        self._thread.join(PRECOMPILE_JOIN_S)


def _prefiller(loaded: LoadedModel, spec: WorkerSpec) -> tuple[Prefiller, Precompiler]:
    import jax
    mesh = make_core_mesh(spec.options.prefill_grid, Executor.DEVICES, jax.devices())
    prefiller = Prefiller(loaded.params, loaded.config, mesh)
    # Compile the smallest shape, greedy and sampled, so the first request does not pay for it;
    # the other buckets follow in the background.
    prefiller.prefill([[0]])
    prefiller.prefill([[0]], [Sampling(temperature=1.0)])
    longest = min(spec.options.max_len, loaded.config.max_seq_len) - 1
    return prefiller, Precompiler(prefiller, longest, prefill_batch_sizes(spec))


def _prefill(prefiller: Prefiller, batch: PrefillBatch):
    """(result, None) or (None, why it failed): a failed batch fails its requests, not the worker.

    The batch is padded with one-token prompts to a power of two: each batch size is a program
    of its own, and compiling one mid-serve stalls every request behind it (seconds on a CPU),
    while padding at most doubles the batch's work.
    """
    prompts = [list(i.prompt_ids) for i in batch.items]
    samplings = [i.sampling for i in batch.items]  # each request's first token is chosen its own way
    pad = (1 << (len(prompts) - 1).bit_length()) - len(prompts)
    prompts += [[0]] * pad
    samplings += [Sampling()] * pad
    try:
        return prefiller.prefill(prompts, samplings), None
    except Exception as e:  # noqa: BLE001 (any error of one batch, reported to the engine)
        return None, one_line(e)


class PrefillWorker:
    capacity = None

    def __init__(self, loaded: LoadedModel, spec: WorkerSpec, channel: Channel):
        self.config, self.channel, self.faults = loaded.config, channel, spec.faults
        self.jax_transfer = spec.options.transport == "jax"
        self.prefiller, self.precompiler = _prefiller(loaded, spec)
        self.fingerprint = model_fingerprint(loaded.config, loaded.params)
        self.held: dict[str, tuple] = {}  # request id -> (SequenceKV, KVHeader)
        self._ships: queue.SimpleQueue = queue.SimpleQueue()
        self._shipper = threading.Thread(target=self._ship_loop, daemon=True, name="kv-ship")
        self._shipper.start()

    def poll_timeout(self) -> float:
        return IDLE_POLL_S

    def apply(self, command) -> None:
        match command:
            case PrefillBatch():
                self._prefill(command)
            case Ship():
                held = self.held.pop(command.request_id, None)
                if held is None:
                    self.channel.send(ShipFailed(command.request_id, "the prefill worker holds no cache for it"))
                else:
                    self._ships.put((command, held))
            case Discard():
                self.held.pop(command.request_id, None)
            case _:
                raise WaferError(f"the prefill worker cannot {type(command).__name__}")

    def _prefill(self, batch: PrefillBatch) -> None:
        t0 = time.perf_counter()
        result, why = _prefill(self.prefiller, batch)
        if result is None:
            self.channel.send(PrefillReport(tuple((i.request_id, None) for i in batch.items), 0.0, why))
            return
        for i, item in enumerate(batch.items):
            seq = sequence_from_prefill(result, i)
            fingerprint = "0" * 32 if item.request_id in self.faults.wrong_fingerprint else self.fingerprint
            self.held[item.request_id] = (seq, header_for(seq, self.config.name, fingerprint))
        outcomes = tuple((item.request_id, int(t)) for item, t in zip(batch.items, result.first_tokens))
        # The batch's whole time on this worker (padding, programs, the caches taken out), as
        # `wafer bench serve-costs` times it: not only the compiled programs' `result.seconds`.
        self.channel.send(PrefillReport(outcomes, time.perf_counter() - t0))

    def _ship_loop(self) -> None:
        while (job := self._ships.get()) is not None:
            command, (seq, header) = job
            t0 = time.perf_counter()
            try:
                if self.jax_transfer:
                    if not send_kv_transfer(seq, header, command.port):
                        raise WaferError("the decode worker refused the JAX transfer")
                    n = header.stream_bytes  # the same payload, pulled rather than streamed
                else:
                    n = send_kv(seq, header, command.port, IO_TIMEOUT_S)
            except WaferError as e:
                self.channel.send(ShipFailed(command.request_id, str(e)))
            else:
                self.channel.send(Shipped(command.request_id, n, time.perf_counter() - t0))

    def between_commands(self) -> None:
        pass

    def close(self) -> None:
        self.precompiler.close()
        self._ships.put(None)
        self._shipper.join(IO_TIMEOUT_S)


def decode_batch(loaded: LoadedModel, spec: WorkerSpec) -> SlotBatch:
    """The decode worker's batch of slots on its wafer mesh, compiled (process 0 and the peers of a
    mesh spanning processes build it alike)."""
    import jax
    opts = spec.options
    mesh = make_core_mesh(opts.decode_grid, opts.executor, jax.devices())
    budget = emulated_spec(opts.sram_budget) if opts.sram_budget else None
    batch = SlotBatch(loaded.params, loaded.config, mesh, opts.scheduler.slots, opts.max_len,
                      MeshOptions(opts.schedule or Schedule.PSUM, opts.groups, greedy=False), budget)
    if opts.schedule is None:  # --schedule auto: measured on this mesh (the peers of a spread mesh agree)
        schedule, seconds = fastest_schedule(mesh, batch.layout.d, opts.scheduler.slots, opts.groups)
        batch.use_schedule(schedule)
        log.info("decode mesh %s: all-reduce schedule %s, measured (%s)", opts.decode_grid, schedule.value,
                 ", ".join(f"{s.value} {t * 1e3:.2f} ms" for s, t in seconds.items())
                 or "not measured: one core, or vcores (psum)")
    batch.compile()
    return batch


class DecodeSlots:
    """The decode batch and which request each committed slot decodes."""

    def __init__(self, loaded: LoadedModel, spec: WorkerSpec, channel: Channel):
        distributed = spec.options.distributed
        self.link = None
        if distributed is None:
            self.batch = decode_batch(loaded, spec)
        else:  # this process leads the peers that hold the rest of the mesh (serve/decode_peers.py)
            self.link = PeerLink.open(distributed, spec, model_fingerprint(loaded.config, loaded.params))
            self.batch = LeaderSlotBatch(decode_batch(loaded, spec), self.link)
            self.link.wait_ready()
        self.channel = channel
        self.request: dict[int, str] = {}  # committed slot -> request id

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    def warm_up(self, layer_by_layer: bool) -> None:
        """Compile the program that fills a slot (`place_layer`'s, or `insert`'s), so the first
        request does not pay for it: a one-position sequence of zeros goes into slot 0 and is
        given back (an inactive slot's rows are never read, and the next sequence overwrites them)."""
        cfg = self.batch.config
        zeros = np.zeros((cfg.n_kv_heads, 1, cfg.head_dim), self.batch.dtype)
        if not layer_by_layer:
            self.batch.insert(0, [zeros] * cfg.n_layers, [zeros] * cfg.n_layers, 1, 0)
            self.batch.evict(0)
            return
        self.batch.reserve(0, 1, 0)
        try:
            for layer in range(cfg.n_layers):
                self.batch.place_layer(0, layer, zeros, zeros)
        finally:
            self.batch.abort(0)

    def started(self, slot: int, request_id: str) -> None:
        self.request[slot] = request_id

    def insert(self, slot: int, request_id: str, sampling: Sampling, k_LKSH, v_LKSH, length: int, token: int) -> None:
        self.batch.insert(slot, k_LKSH, v_LKSH, length, token, sampling)
        self.started(slot, request_id)

    def evict(self, slot: int) -> None:
        self.batch.evict(slot)
        self.request.pop(slot, None)

    def step(self) -> None:
        live = [int(s) for s in np.flatnonzero(self.batch.active)]
        if not live:
            self.channel.send(StepReport((), 0.0))
            return
        t0 = time.perf_counter()
        tokens = self.batch.step()  # each slot samples as its request asked (SlotBatch.reserve)
        seconds = time.perf_counter() - t0
        self.channel.send(StepReport(tuple((self.request[s], s, int(tokens[s])) for s in live), seconds))


@dataclasses.dataclass
class _Incoming:
    """A placement whose stream is on its way into `slot`."""

    request_id: str
    slot: int
    prompt_len: int
    sampling: Sampling
    intake: KVIntake
    reserved: bool = False
    nbytes: int = 0


class DecodeWorker:
    def __init__(self, loaded: LoadedModel, spec: WorkerSpec, channel: Channel):
        self.slots = DecodeSlots(loaded, spec, channel)
        self.slots.warm_up(layer_by_layer=True)
        self.batch, self.channel = self.slots.batch, channel
        self.capacity = self.batch.capacity
        self.landing = KVLanding(self.batch)
        # A sender that has not connected by the handoff deadline never will: the scheduler has
        # failed its request by then and the evict cancels the listener anyway.
        self.accept_timeout_s = spec.options.scheduler.deadlines.handoff_s + ACCEPT_GRACE_S
        self.jax_transfer = spec.options.transport == "jax"
        self.incoming: dict[int, _Incoming] = {}
        self.ended: list[KVIntake] = []  # cancelled intakes, joined at close

    def poll_timeout(self) -> float:
        return LANDING_POLL_S if self.incoming else IDLE_POLL_S

    def apply(self, command) -> None:
        match command:
            case Expect():
                if command.slot in self.incoming or self.batch.active[command.slot]:
                    self.channel.send(LandFailed(command.request_id, command.slot, f"slot {command.slot} is occupied"))
                    return
                intake = KVIntake(self.accept_timeout_s, IO_TIMEOUT_S, self.jax_transfer)
                self.incoming[command.slot] = _Incoming(command.request_id, command.slot, command.prompt_len,
                                                        command.sampling, intake)
                self.channel.send(Listening(command.request_id, command.slot, intake.port))
            case Evict():
                if command.slot in self.incoming:
                    self._drop(self.incoming.pop(command.slot))
                else:
                    self.slots.evict(command.slot)
            case Step():
                self.between_commands()
                self.slots.step()
            case _:
                raise WaferError(f"the decode worker cannot {type(command).__name__}")

    def between_commands(self) -> None:
        """Place whatever layers have arrived; commit the streams that are complete."""
        for slot, inc in list(self.incoming.items()):
            try:
                while self._advance(inc):
                    pass
            except WaferError as e:
                del self.incoming[slot]
                self._drop(inc)
                self.channel.send(LandFailed(inc.request_id, slot, str(e)))

    def _advance(self, inc: _Incoming) -> bool:
        """Apply one item of `inc`'s stream; returns whether to look for another."""
        try:
            kind, value = inc.intake.items.get_nowait()
        except queue.Empty:
            return False
        if kind == "header":
            self.landing.check(value)
            if value.tokens != inc.prompt_len:
                raise KVStreamError(f"stream of {value.tokens} positions for a prompt of {inc.prompt_len}")
            self.batch.reserve(inc.slot, value.tokens, value.first_token, inc.sampling)
            inc.reserved, inc.nbytes = True, value.stream_bytes
        elif kind == "frame":
            k = convert_frame(value.k_KSH, self.batch.dtype, False)
            v = convert_frame(value.v_KSH, self.batch.dtype, False)
            self.batch.place_layer(inc.slot, value.layer, k, v)
        elif kind == "end":
            self.batch.commit(inc.slot)
            del self.incoming[inc.slot]
            self.slots.started(inc.slot, inc.request_id)
            self.channel.send(Landed(inc.request_id, inc.slot, inc.nbytes))
            return False
        else:
            raise KVStreamError(value)
        return True

    def _drop(self, inc: _Incoming) -> None:
        inc.intake.cancel()
        if inc.reserved:
            self.batch.abort(inc.slot)
        self.ended.append(inc.intake)

    def close(self) -> None:
        for inc in self.incoming.values():
            inc.intake.cancel()
            self.ended.append(inc.intake)
        for intake in self.ended:
            intake.join(IO_TIMEOUT_S)
        self.slots.close()


class IntegratedWorker:
    def __init__(self, loaded: LoadedModel, spec: WorkerSpec, channel: Channel):
        self.slots = DecodeSlots(loaded, spec, channel)  # the decode mesh first: it may need more devices
        self.slots.warm_up(layer_by_layer=False)
        self.prefiller, self.precompiler = _prefiller(loaded, spec)
        self.channel = channel
        self.capacity = self.slots.batch.capacity

    def poll_timeout(self) -> float:
        return IDLE_POLL_S

    def apply(self, command) -> None:
        match command:
            case PrefillBatch():
                self._prefill(command)
            case Evict():
                self.slots.evict(command.slot)
            case Step():
                self.slots.step()
            case _:
                raise WaferError(f"the integrated worker cannot {type(command).__name__}")

    def _prefill(self, batch: PrefillBatch) -> None:
        t0 = time.perf_counter()
        result, why = _prefill(self.prefiller, batch)
        if result is None:
            self.channel.send(PrefillReport(tuple((i.request_id, None) for i in batch.items), 0.0, why))
            return
        outcomes = []
        for i, item in enumerate(batch.items):
            k_LKSH, v_LKSH = result.sequence_kv(i)
            token = int(result.first_tokens[i])
            try:
                self.slots.insert(item.slot, item.request_id, item.sampling, k_LKSH, v_LKSH, len(item.prompt_ids),
                                  token)
            except WaferError as e:
                why, token = str(e), None
            outcomes.append((item.request_id, token))
        # The batch's whole time, the caches placed in their slots included (see PrefillWorker).
        self.channel.send(PrefillReport(tuple(outcomes), time.perf_counter() - t0, why or ""))

    def between_commands(self) -> None:
        pass

    def close(self) -> None:
        self.precompiler.close()
