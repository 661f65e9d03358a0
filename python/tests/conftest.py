"""Fixtures: a private dbus-daemon and a shmlinkd child per test module.

The binaries come from the workspace's cargo build: ``$SHMLINKD`` if set,
else ``shmlinkd`` in the cargo target directory (``cargo metadata`` knows
where, ``CARGO_TARGET_DIR`` included), debug or release, whichever is newer.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmlink

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 10.0

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def find_daemon() -> Path:
    """The shmlinkd binary the cargo build made."""
    if os.environ.get("SHMLINKD"):
        return Path(os.environ["SHMLINKD"])
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    target = Path(json.loads(meta.stdout)["target_directory"])
    found = [p for p in (target / "debug" / "shmlinkd", target / "release" / "shmlinkd") if p.is_file()]
    if not found:
        raise RuntimeError(f"no shmlinkd under {target}: build it with `cargo build -p shmlink-server`")
    return max(found, key=lambda p: p.stat().st_mtime)


class Broker:
    """A running private bus with a shmlinkd on it."""

    def __init__(self, extra_args: list[str], config: str | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="shmlink-py-")
        d = Path(self._dir.name)
        d.chmod(0o755)  # tests connect as other users too
        (d / "bus.conf").write_text(BUS_CONFIG.format(dir=d))
        with open(d / "bus.log", "w") as bus_log:
            self.bus = subprocess.Popen(
                ["dbus-daemon", "--nofork", f"--config-file={d / 'bus.conf'}", "--print-address=1"],
                stdout=subprocess.PIPE,
                stderr=bus_log,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        assert self.bus.stdout is not None
        self.address = self.bus.stdout.readline().strip()
        if not self.address:
            self.stop()
            raise RuntimeError("dbus-daemon printed no address")
        args = [str(find_daemon()), "--address", self.address, *extra_args]
        if config is not None:
            (d / "shmlinkd.toml").write_text(config)
            args += ["--config", str(d / "shmlinkd.toml")]
        self.log = d / "shmlinkd.log"
        with open(self.log, "w") as log:
            self.daemon = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = shmlink.Client(self.address, call_timeout=1.0)
        while True:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"shmlinkd exited early:\n{self.log.read_text()}")
            try:
                client.services()
                return
            except shmlink.RefusedError:
                # The name has no owner yet (ServiceUnknown); poll until the deadline.
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shmlinkd did not start:\n{self.log.read_text()}") from None
                time.sleep(0.005)

    def client(self) -> shmlink.Client:
        return shmlink.Client(self.address)

    def stop(self) -> None:
        for p in (getattr(self, "daemon", None), self.bus):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.bus.stdout is not None:
            self.bus.stdout.close()
        self._dir.cleanup()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A private bus and daemon shared by the tests of one module."""
    b = Broker([])
    yield b
    b.stop()


@pytest.fixture()
def client(broker: Broker) -> shmlink.Client:
    return broker.client()


@pytest.fixture()
def make_broker() -> Iterator[type[Broker]]:
    """Starts brokers with their own flags or configuration; stops them after the test."""
    started: list[Broker] = []

    def make(extra_args: list[str] = [], config: str | None = None) -> Broker:
        b = Broker(list(extra_args), config)
        started.append(b)
        return b

    yield make  # type: ignore[misc]
    for b in started:
        b.stop()
