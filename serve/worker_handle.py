"""One worker process as the engine's event loop sees it: started with the spawn context, commands
written by a thread of its own (a hung worker that stops reading its pipe must never block the
event loop), reports read by an event-loop reader on the pipe, and its exit seen as the pipe's end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Callable

from serve.worker_process import worker_main
from serve.worker_spec import Role, WorkerSpec

# How long reaping waits for a process that was told to stop (or killed) before giving up on it.
JOIN_TIMEOUT_S = 10.0


class WorkerHandle:
    """A restartable worker process: `start`, `send`, `kill`, `reap`; reports go to `on_report`
    and the process's exit (its pipe closing) to `on_exit`, both on the event loop."""

    def __init__(self, spec: WorkerSpec, cpus: tuple[int, ...], on_report: Callable, on_exit: Callable):
        self.spec, self.cpus = spec, cpus
        self.on_report, self.on_exit = on_report, on_exit
        self.proc = None
        self.conn = None
        self.ready = False  # it reported Ready and has not died since
        self.killed = False  # killed on purpose (hung): its last reports are not trusted
        self.starts = 0
        self.failed_starts = 0  # deaths in a row before reporting Ready (the restart delay grows)
        self._outbox: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(self.cpus, pickle.dumps(self.spec), child),
                           name=f"wafer-{self.role.value}", daemon=True)
        proc.start()
        child.close()  # the child holds its own copy: the pipe ends when the child does
        self.proc, self.conn, self._loop = proc, parent, loop
        self.ready = self.killed = False
        self.starts += 1
        self._outbox = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, args=(parent, self._outbox), daemon=True,
                                        name=f"wafer-{self.role.value}-writer")
        self._writer.start()
        loop.add_reader(parent.fileno(), self._readable)

    def send(self, command) -> None:
        """Queue a command for the worker (dropped if it is not running)."""
        if self._outbox is not None:
            self._outbox.put(command)

    @staticmethod
    def _write(conn, outbox: queue.SimpleQueue) -> None:
        while (command := outbox.get()) is not None:
            try:
                conn.send(command)
            except OSError:
                return  # the worker is gone; its exit reaches the engine through the reader

    def _readable(self) -> None:
        conn = self.conn
        try:
            while conn is not None and conn is self.conn and conn.poll():
                self.on_report(self, conn.recv())
        except (EOFError, OSError):
            if conn is self.conn:
                self._stop_reading()
                self.on_exit(self)

    def _stop_reading(self) -> None:
        if self.conn is not None and self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def kill(self) -> None:
        """SIGKILL the process (a hung worker); its exit is reported as any other."""
        self.killed, self.ready = True, False
        if self.alive():
            self.proc.kill()

    def reap(self, timeout_s: float = JOIN_TIMEOUT_S) -> int | None:
        """Wait for the process to end (killing it if it does not), close the pipe, stop the
        writer. Returns its exit code."""
        self.ready = False
        if self.proc is None:
            return None
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout_s)
        code = self.proc.exitcode
        self._stop_reading()
        if self._outbox is not None:
            self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(timeout_s)
        self.conn.close()
        if code is not None:
            self.proc.close()
        self.proc = self.conn = self._outbox = self._writer = None
        return code
