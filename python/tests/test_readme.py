"""The README's "From Python" program runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from broker import REPO, Broker


def test_readme_program(broker: Broker) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### From Python") :]
    program = re.search(r"```python\n(.*?)```", section, re.S)
    assert program is not None
    done = subprocess.run(
        [sys.executable, "-c", program.group(1)],
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": broker.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "4096", "4096", "b'ping'"]
