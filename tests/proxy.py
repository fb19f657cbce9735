"""A loopback TCP proxy for fault tests: freeze (black hole), thaw, cut connections.

Like asyncpg's ``ProxiedClusterTestCase`` (``_testbase/fuzzer.py``): the library connects to
the proxy instead of the server, and the test makes the network misbehave.

- :meth:`TCPProxy.freeze` stops forwarding bytes both ways and keeps every socket open: the
  peer sees a server that stopped answering (a frozen server, a network black hole). New
  connections are accepted but get no answer either. Bytes already read are held, and
  delivered after :meth:`TCPProxy.thaw` (as a frozen then resumed server would).
- :meth:`TCPProxy.cut` closes every open connection at once (both sides, reset); new
  connections work again (unless frozen).

The proxy runs an asyncio loop in its own thread, so it keeps working (or keeps not
working) while the test's event loop is blocked. Its methods are called from any thread and
return once the proxy applied them. Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")

_CHUNK = 65536


class TCPProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"loopback only, got {target_host!r}")
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tcp-proxy->{target_port}", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def for_url(cls, url: str) -> TCPProxy:
        """A started proxy in front of the server of a PostgreSQL ``url``."""
        parsed = make_url(url)
        return cls(parsed.port or 5432, parsed.host or "127.0.0.1").start()

    def url(self, url: str) -> str:
        """``url`` pointed at the proxy instead of the server."""
        return (
            make_url(url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    # -- control, from any thread --------------------------------------------------------

    def start(self) -> TCPProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def freeze(self) -> None:
        """Stop forwarding bytes both ways; keep every connection open."""
        self._call(self._set_flowing(False))

    def thaw(self) -> None:
        """Forward again, held bytes first."""
        self._call(self._set_flowing(True))

    def cut(self) -> int:
        """Reset every open connection now (both sides); returns how many were open."""
        return self._call(self._cut())

    @property
    def open_connections(self) -> int:
        return self._call(self._count())

    def close(self) -> None:
        """Stop listening, reset every connection, stop the proxy's thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TCPProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy's loop ----------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _count(self) -> int:
        return len(self._writers) // 2

    async def _cut(self) -> int:
        writers = list(self._writers)
        for writer in writers:
            _reset(writer)
        return len(writers) // 2

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(client_w)
                return
            pair = (client_w, server_w)
            self._writers.update(pair)
            try:
                pumps = [
                    asyncio.create_task(self._pump(client_r, server_w)),
                    asyncio.create_task(self._pump(server_r, client_w)),
                ]
                try:
                    await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pump in pumps:
                        pump.cancel()
                    await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                self._writers.difference_update(pair)
                for writer in pair:
                    _reset(writer)
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flowing = self._flowing
        assert flowing is not None
        try:
            while True:
                await flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    return
                await flowing.wait()  # frozen meanwhile: hold the bytes
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not an orderly FIN: a cut network link."""
    sock = writer.get_extra_info("socket")
    if sock is not None and not writer.transport.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
