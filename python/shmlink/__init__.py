"""shmlink: shared-memory sessions with services hosted by ``shmlinkd``.

A :class:`Client` connects to the broker ``org.shmlink.Broker1`` on a D-Bus
bus; :meth:`Client.open` opens a :class:`Session` with one of its services.
D-Bus carries only that set-up: messages then travel through two sealed
shared-memory rings, copied straight from the caller's buffer into the ring.

This package is a thin layer over the Rust client library (the same data
plane and the same checks of what the broker hands over). Blocking calls
release the GIL. :class:`AsyncSession` (from :meth:`Client.open_async`)
offers the same on asyncio: ``await session.recv()`` waits on the
session's file descriptors with ``loop.add_reader``, no thread involved.

Example::

    import shmlink

    with shmlink.Client("session").open("echo") as session:
        session.send(b"hello")
        assert session.recv() == b"hello"
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _shmlink
from ._shmlink import (
    AccessDeniedError,
    ClosedError,
    ConnectError,
    Error,
    InvalidOptionError,
    LimitExceededError,
    ProtocolError,
    RefusedError,
    Session,
    TimeoutError,
    UnknownServiceError,
    UnknownSessionError,
)

if TYPE_CHECKING:
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer

T = TypeVar("T")

__all__ = [
    "AccessDeniedError",
    "AsyncSession",
    "Client",
    "ClosedError",
    "ConnectError",
    "Error",
    "InvalidOptionError",
    "LimitExceededError",
    "ProtocolError",
    "RefusedError",
    "Session",
    "TimeoutError",
    "UnknownServiceError",
    "UnknownSessionError",
]


class Client(_shmlink.Client):
    """A connection to the broker on ``bus``: "session", "system" or a
    D-Bus address such as ``"unix:path=/run/x"``. D-Bus calls give up after
    ``call_timeout`` seconds (default 10)."""

    async def open_async(self, service: str, **options: Any) -> AsyncSession:
        """Like :meth:`open` (same keyword arguments), for asyncio: the one
        D-Bus call runs in the loop's default executor."""
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(
            None, functools.partial(self.open, service, **options)
        )
        return AsyncSession(session)


class AsyncSession:
    """A :class:`Session` for asyncio.

    ``await recv()`` checks the ring without blocking and otherwise waits
    for the session's data eventfd or hang-up socket to become readable
    (``loop.add_reader``); a wake-up is only a hint, the ring is checked
    again after each one. ``send``, ``finish`` and ``close`` may wait for
    room in the ring or for the broker, so they run in the loop's default
    executor; one ``send`` and one ``recv`` may be under way at once.

    An async context manager (leaving it closes the session) and an async
    iterator over the messages until the service finishes sending.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        """The underlying blocking session."""
        self._receiving = False

    @property
    def path(self) -> str:
        """The session's object path on the bus."""
        return self.session.path

    @property
    def service(self) -> str:
        """The service's name."""
        return self.session.service

    @property
    def max_message(self) -> int:
        """Largest message either side may send, in bytes."""
        return self.session.max_message

    async def recv(self) -> bytes | None:
        """Receives the next message; None once the service finished sending.

        Honours the session's ``timeout`` (raising :class:`TimeoutError`).
        """
        if self._receiving:
            raise RuntimeError("another task is already receiving from this session")
        self._receiving = True
        try:
            loop = asyncio.get_running_loop()
            timeout = self.session.timeout
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                ready, message = self.session._try_recv()
                if ready:
                    return message
                await self._readable(loop, deadline)
        finally:
            self._receiving = False

    async def _readable(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        """Waits until data or a hang-up may be there (or the deadline passed)."""
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        fds = (self.session._readable_fd(), self.session._hangup_fd())
        for fd in fds:
            loop.add_reader(fd, wake)
        try:
            if deadline is None:
                await woken
            else:
                try:
                    await asyncio.wait_for(woken, max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"receiving from {self.service} timed out after {self.session.timeout} s"
                    ) from None
        finally:
            for fd in fds:
                loop.remove_reader(fd)

    async def send(self, data: Buffer) -> None:
        """Sends one message (any C-contiguous bytes-like object); do not
        modify ``data`` until this returns."""
        await self._blocking(self.session.send, data)

    async def finish(self) -> None:
        """Tells the service this side will send nothing more."""
        await self._blocking(self.session.finish)

    async def close(self) -> None:
        """Ends the session on the broker and unmaps it."""
        await self._blocking(self.session.close)

    async def counters(self) -> dict[str, int]:
        """The broker's counters for this session (see :meth:`Session.counters`)."""
        return await self._blocking(self.session.counters)

    async def service_state(self) -> dict[str, Any]:
        """The service's own state (see :meth:`Session.service_state`)."""
        return await self._blocking(self.session.service_state)

    async def _blocking(self, f: Callable[..., T], *args: Any) -> T:
        """Runs a call that may block in the loop's default executor."""
        return await asyncio.get_running_loop().run_in_executor(None, f, *args)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self.close()
        except Error:
            if exc_type is None:
                raise

    def __aiter__(self) -> AsyncSession:
        return self

    async def __anext__(self) -> bytes:
        message = await self.recv()
        if message is None:
            raise StopAsyncIteration
        return message
