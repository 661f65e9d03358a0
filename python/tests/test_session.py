"""Blocking sessions against a real shmlinkd on a private bus."""

from __future__ import annotations

import array
import builtins
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker

import shmlink


def source_message(i: int, size: int) -> bytes:
    """Message i of the source service: byte j is (i + j) mod 251."""
    return bytes((i + j) % 251 for j in range(size))


def test_echo_round_trip_of_every_bytes_like(client: shmlink.Client) -> None:
    floats = np.arange(1000, dtype=np.float64)
    grid = np.arange(64, dtype=np.uint16).reshape(8, 8)
    payloads: list[tuple[Any, bytes]] = [
        (b"frame 1", b"frame 1"),
        (bytearray(b"mutable"), b"mutable"),
        (memoryview(b"0123456789")[2:7], b"23456"),
        (array.array("i", [1, 2, 3]), array.array("i", [1, 2, 3]).tobytes()),
        (floats, floats.tobytes()),
        (grid, grid.tobytes()),
        (b"", b""),
    ]
    with client.open("echo", capacity=1 << 16) as s:
        for data, expected in payloads:
            s.send(data)
            assert s.recv() == expected


def test_non_contiguous_and_non_buffer_input_is_refused(client: shmlink.Client) -> None:
    with client.open("echo") as s:
        with pytest.raises(ValueError, match="contiguous"):
            s.send(np.arange(16, dtype=np.uint8)[::2])
        with pytest.raises(ValueError, match="contiguous"):
            s.send(memoryview(np.arange(16, dtype=np.int32))[::2])
        with pytest.raises(TypeError, match="bytes-like"):
            s.send("text")  # type: ignore[arg-type]
        # The session is still usable.
        s.send(b"after")
        assert s.recv() == b"after"


def test_messages_larger_than_the_ring_stream_through(client: shmlink.Client) -> None:
    big = np.random.default_rng(7).integers(0, 256, 5 << 20, dtype=np.uint8)
    with client.open("echo", capacity=1 << 16) as s:
        got: list[bytes | None] = []
        # echo answers while we send: receive on a second thread, as a
        # program must once messages outgrow the rings.
        t = threading.Thread(target=lambda: got.append(s.recv()))
        t.start()
        s.send(big)
        t.join(30)
        assert got == [big.tobytes()]


def test_source_iterates_until_end_of_stream(client: shmlink.Client) -> None:
    with client.open("source", options={"count": 5, "message-size": 300}) as s:
        got = list(s)
        assert got == [source_message(i, 300) for i in range(5)]
        assert s.recv() is None


def test_sink_sees_every_byte(client: shmlink.Client) -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 1, 4096, 65536, 300_000)]
    with client.open("sink") as s:
        for c in chunks:
            s.send(c)
        s.finish()
        assert s.recv() is None  # the sink answers end of stream after the last message
        state = s.service_state()
        counters = s.counters()
    total = b"".join(c.tobytes() for c in chunks)
    assert state["bytes"] == len(total)
    assert state["messages"] == len(chunks)
    assert state["crc32"] == zlib.crc32(total)
    assert counters["bytes_to_server"] == len(total)
    assert counters["messages_to_server"] == len(chunks)


def test_unknown_service(client: shmlink.Client) -> None:
    with pytest.raises(shmlink.UnknownServiceError) as e:
        client.open("no-such-service")
    assert e.value.dbus_name == "org.shmlink.Error.UnknownService"
    assert isinstance(e.value, shmlink.RefusedError)
    assert isinstance(e.value, shmlink.Error)


def test_invalid_options(client: shmlink.Client) -> None:
    with pytest.raises(shmlink.InvalidOptionError) as e:
        client.open("echo", capacity=1)
    assert e.value.dbus_name == "org.shmlink.Error.InvalidCapacity"
    with pytest.raises(shmlink.InvalidOptionError):
        client.open("echo", options={"no-such-option": 1})
    with pytest.raises(ValueError, match="park"):
        client.open("echo", wakeup="nap")  # type: ignore[arg-type]


def test_limit_exceeded(make_broker: Callable[..., Broker]) -> None:
    client = make_broker(["--sessions-per-connection", "1"]).client()
    with client.open("echo"):
        with pytest.raises(shmlink.LimitExceededError, match="sessions_per_connection") as e:
            client.open("echo")
        assert e.value.dbus_name == "org.shmlink.Error.LimitExceeded"


ACCESS_CHECK = """
import sys, shmlink
client = shmlink.Client(sys.argv[1])
try:
    client.open("sink")
except shmlink.AccessDeniedError as e:
    assert e.dbus_name == "org.freedesktop.DBus.Error.AccessDenied", e.dbus_name
    print("denied:", e)
else:
    raise SystemExit("sink opened for a user the configuration leaves out")
with client.open("echo") as s:  # other services stay open to this user
    s.send(b"x")
    assert s.recv() == b"x"
"""


def run_access_check(
    python: list[str], env: dict[str, str], address: str
) -> subprocess.CompletedProcess[str]:
    """Runs ACCESS_CHECK with the interpreter command given."""
    return subprocess.run(
        [*python, "-c", ACCESS_CHECK, address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_access_denied(make_broker: Callable[..., Broker]) -> None:
    broker = make_broker(config="[services.sink]\nallow_users = [4242]\n")
    if os.getuid() != 0:
        done = run_access_check([sys.executable], os.environ.copy(), broker.address)
    else:
        # Root may use every service: check as nobody (uid 65534). nobody may
        # not be able to reach this checkout or its venv (a private temporary
        # directory), so it runs the system interpreter on a copy of the
        # package in a directory it can read.
        with tempfile.TemporaryDirectory(prefix="shmlink-py-nobody-") as d:
            os.chmod(d, 0o755)
            shutil.copytree(
                Path(shmlink.__file__).parent,
                Path(d) / "shmlink",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": d}
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            python = os.path.realpath(sys.executable)
            done = run_access_check([*prefix, python, "-s"], env, broker.address)
    assert done.returncode == 0, done.stderr
    assert "uid" in done.stdout and "sink" in done.stdout


def test_connect_error() -> None:
    with pytest.raises(shmlink.ConnectError):
        shmlink.Client("unix:path=/nonexistent/shmlink-test-bus")


def test_recv_times_out_and_the_session_survives(client: shmlink.Client) -> None:
    with client.open("echo", timeout=0.2) as s:
        start = time.monotonic()
        with pytest.raises(shmlink.TimeoutError, match="receiving from echo") as e:
            s.recv()
        assert time.monotonic() - start >= 0.2
        assert isinstance(e.value, shmlink.Error)
        assert isinstance(e.value, builtins.TimeoutError)
        s.timeout = None
        s.send(b"still there")
        assert s.recv() == b"still there"


def test_a_send_that_timed_out_stops_the_sending_side_only(client: shmlink.Client) -> None:
    message = bytes(range(256)) * 4096  # 1 MiB
    with client.open("echo", capacity=1 << 16, timeout=0.2) as s:
        # Nobody reads the echoes: the rings and the broker's bounded
        # buffers fill up, and a send stops making progress.
        sent = 0
        with pytest.raises(shmlink.TimeoutError, match="can no longer send"):
            while sent < 1000:
                s.send(message)
                sent += 1
        assert 0 < sent < 1000
        with pytest.raises(shmlink.ClosedError, match="can no longer send"):
            s.send(b"x")
        # What was sent whole comes back whole.
        assert s.recv() == message


def test_closed_by_this_side(client: shmlink.Client) -> None:
    s = client.open("echo")
    path = s.path
    assert any(row[0] == path for row in client.list_sessions())
    s.close()
    assert s.closed
    s.close()  # a second close does nothing
    with pytest.raises(shmlink.ClosedError):
        s.send(b"x")
    with pytest.raises(shmlink.ClosedError):
        s.recv()
    with pytest.raises(shmlink.ClosedError):
        s._readable_fd()
    assert all(row[0] != path for row in client.list_sessions())


def test_dropping_a_session_ends_it_on_the_broker(client: shmlink.Client) -> None:
    s = client.open("echo")
    path = s.path
    assert any(row[0] == path for row in client.list_sessions())
    del s  # no close(): the hang-up socket closes with the object
    deadline = time.monotonic() + 10
    while any(row[0] == path for row in client.list_sessions()):
        assert time.monotonic() < deadline, "the broker kept a dropped session"
        time.sleep(0.01)


def test_ended_by_the_broker(client: shmlink.Client, broker: Broker) -> None:
    s = client.open("echo")
    s.send(b"sent before the end")
    # Wait (with a deadline) until echo answered, so the answer is in the ring.
    deadline = time.monotonic() + 10
    while s.counters()["messages_to_client"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # Another connection of the same user (or root) may close it.
    broker.client().close_session(s.path)
    assert s.recv() == b"sent before the end"
    with pytest.raises(shmlink.ClosedError, match="closed by the other side"):
        s.recv()
    with pytest.raises(shmlink.UnknownSessionError):
        s.close()
    assert s.closed


def test_recv_releases_the_gil(client: shmlink.Client) -> None:
    with client.open("echo") as s:
        got: list[bytes | None] = []
        t = threading.Thread(target=lambda: got.append(s.recv()))
        t.start()
        # Python code runs on this thread while the other one waits in recv.
        spins = 0
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            spins += 1
        assert t.is_alive() and not got
        s.send(b"wake up")
        t.join(10)
        assert got == [b"wake up"]
        assert spins > 1000


def test_a_blocked_recv_yields_to_ctrl_c(client: shmlink.Client) -> None:
    with client.open("echo") as s:
        main = threading.get_ident()
        timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            s.recv()
        assert time.monotonic() - start < 5
        timer.join()
