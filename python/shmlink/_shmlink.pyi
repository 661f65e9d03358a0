"""The native part of shmlink (PyO3 over the Rust client library)."""

import builtins
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

class Error(Exception):
    """Base class of every shmlink error."""

class ConnectError(Error):
    """The bus could not be reached."""

class RefusedError(Error):
    """The broker (or the bus) refused a call."""

    dbus_name: str
    """The D-Bus error name, e.g. "org.shmlink.Error.UnknownService"."""

class UnknownServiceError(RefusedError):
    """The broker hosts no service of that name."""

class InvalidOptionError(RefusedError):
    """An option (or the capacity) is unknown, ill-typed or out of range."""

class LimitExceededError(RefusedError):
    """A limit of the broker would be exceeded; the message names it."""

class AccessDeniedError(RefusedError):
    """The caller may not do this."""

class UnknownSessionError(RefusedError):
    """The session does not exist (any more)."""

class TimeoutError(Error, builtins.TimeoutError):
    """A D-Bus call or a blocking session call made no progress within its timeout
    (also a built-in ``TimeoutError``)."""

class ClosedError(Error):
    """The session is over: closed by this side, or ended by the broker."""

class ProtocolError(Error):
    """The broker broke the contract (bad reply, corrupt ring or frame, bad fd, over a limit)."""

class Client:
    """A connection to the broker on ``bus``: "session", "system" or a D-Bus address."""

    def __init__(self, bus: str = "session", *, call_timeout: float | None = None) -> None: ...
    def open(
        self,
        service: str,
        *,
        capacity: int | None = None,
        wakeup: Literal["park", "spin"] | None = None,
        spin_us: int | None = None,
        timeout: float | None = None,
        options: dict[str, int | str | bool] | None = None,
    ) -> Session:
        """Opens a session with ``service`` and maps its rings.

        ``capacity``: bytes per ring; ``wakeup``: how both sides wait
        ("park": sleep at once, "spin": busy-poll ``spin_us`` first);
        ``timeout``: seconds a blocking session call may make no progress;
        ``options``: the service's own options (e.g. ``{"count": 3}`` for source).
        """
    def ping(self) -> float:
        """Round trip of a D-Bus ping to the broker, in seconds."""
    def version(self) -> str:
        """The broker's version."""
    def services(self) -> list[str]:
        """Names of the services the broker hosts."""
    def session_count(self) -> int:
        """Number of sessions open on the broker."""
    def max_message_size(self) -> int:
        """Largest message size the broker allows."""
    def close_session(self, path: str) -> None:
        """Ends the session at ``path`` (its owner or root only)."""
    def list_sessions(self) -> list[tuple[str, str, str, int, int]]:
        """Every open session as (path, service, owner bus name, uid, pid)."""

class Session:
    """An open session (from :meth:`Client.open`).

    A context manager (leaving it closes the session) and an iterator over
    the received messages until the service finishes sending.
    """

    @property
    def path(self) -> str:
        """The session's object path on the bus."""
    @property
    def service(self) -> str:
        """The service's name."""
    @property
    def max_message(self) -> int:
        """Largest message either side may send, in bytes."""
    @property
    def send_capacity(self) -> int:
        """Usable bytes of the ring towards the service."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
    timeout: float | None
    """Seconds a blocking call may make no progress (None: no limit)."""

    def send(self, data: Buffer) -> None:
        """Sends one message: any C-contiguous bytes-like object, copied
        straight into the shared ring with the GIL released (do not modify
        it from another thread meanwhile). Waits while the ring is full."""
    def finish(self) -> None:
        """Tells the service this side will send nothing more."""
    def recv(self) -> bytes | None:
        """Receives the next message; None once the service finished sending."""
    def close(self) -> None:
        """Ends the session on the broker and unmaps it (a second call does nothing)."""
    def counters(self) -> dict[str, int]:
        """bytes_to_server, messages_to_server, bytes_to_client, messages_to_client."""
    def service_state(self) -> dict[str, Any]:
        """The service's own state (for sink: bytes, messages, crc32)."""
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def __enter__(self) -> Session: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
    def _readable_fd(self) -> int: ...
    def _hangup_fd(self) -> int: ...
    def _try_recv(self) -> tuple[bool, bytes | None]: ...
