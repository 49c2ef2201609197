"""Running the front end: start the engine, listen, and shut down in order on SIGINT/SIGTERM.

Shutdown: stop listening and refuse new generation requests (503), give the requests in flight
`grace_s` to finish, stop the engine (which fails whatever is still in flight, so every handler
answers), then close the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from model.tokenizer import TextTokenizer
from serve.http import FRONT_END, make_app
from serve.metrics import ServeMetrics
from serve.requests import Engine

log = logging.getLogger(__name__)

GRACE_S = 10.0  # how long requests in flight may keep going after a shutdown signal
CLOSE_S = 5.0  # then, how long aiohttp waits for handlers before it closes their connections


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0: any free port); returns the runner and the port bound."""
    # handler_cancellation: a client that disconnects cancels its handler at once, which cancels
    # its request on the engine (serve/http.py), even while no token is being written to it.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=CLOSE_S, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


async def shutdown(runner: web.AppRunner, engine: Engine, grace_s: float = GRACE_S) -> None:
    """Stop listening, let requests in flight finish for up to `grace_s`, stop the engine, close."""
    fe = runner.app[FRONT_END]
    fe.draining = True
    for site in list(runner.sites):
        await site.stop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace_s):
            await fe.idle.wait()
    await engine.stop()
    await runner.cleanup()


async def serve(engine: Engine, tokenizer: TextTokenizer, metrics: ServeMetrics, host: str, port: int,
                model_name: str | None = None, on_listening: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, grace_s: float = GRACE_S) -> None:
    """Start `engine`, serve it on host:port until SIGINT/SIGTERM (or `stop` is set), shut down.

    model_name: the name clients send (default: the engine's config name).
    on_listening: called with the base URL once the server accepts requests.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal():
        stop.set()
        # A second signal is not ignored: it gets Python's default (KeyboardInterrupt, termination).
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        started = asyncio.create_task(engine.start())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not started.done():  # a signal while the workers were starting
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await started
            await engine.stop()
            return
        try:
            started.result()
        except BaseException:
            await engine.stop()
            raise
        model_name = model_name or engine.config.name
        app = make_app(engine, tokenizer, model_name, metrics)
        try:
            runner, bound = await start_site(app, host, port)
        except BaseException:
            await engine.stop()
            raise
        log.info("serving %s on http://%s:%d", model_name, host, bound)
        if on_listening is not None:
            on_listening(f"http://{host}:{bound}")
        try:
            await stop.wait()
        finally:
            await shutdown(runner, engine, grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
