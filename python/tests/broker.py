"""A private dbus-daemon with a shmlinkd on it, for the tests and bench.py.

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
from pathlib import Path

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


def target_dir() -> Path:
    """The workspace's cargo target directory."""
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(json.loads(meta.stdout)["target_directory"])


def find_binary(name: str) -> Path:
    """A binary of the cargo build, debug or release, whichever is newer."""
    target = target_dir()
    found = [p for p in (target / "debug" / name, target / "release" / name) if p.is_file()]
    if not found:
        raise RuntimeError(f"no {name} under {target}: build it with cargo build")
    return max(found, key=lambda p: p.stat().st_mtime)


def find_daemon() -> Path:
    """The shmlinkd binary: $SHMLINKD, else the cargo build's."""
    if os.environ.get("SHMLINKD"):
        return Path(os.environ["SHMLINKD"])
    return find_binary("shmlinkd")


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
