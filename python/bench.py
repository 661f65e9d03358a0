"""Throughput of 64 KiB messages (or, with --all-sizes, 64 B to 1 MiB) into `sink`: the Python package beside the
Rust client, against one private shmlinkd, in the same run.

Build both in release mode first (the numbers of a debug build mean little):

    cargo build --release -p shmlinkd -p shmlink-cli
    (cd python && VIRTUAL_ENV=... maturin develop --release)
    python python/bench.py [--rounds 5] [--seconds 2]

The Rust side is `shmlink bench --only throughput` (its "shmlink sink" row:
one thread sending the same 64 KiB message over and over into a sink
session with 1 MiB rings); the Python side runs the same loop with
`Session.send`, once with a bytes object and once with a numpy array.
Rounds alternate between the two so that a busy machine affects both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from broker import Broker, find_binary, find_daemon  # noqa: E402

import shmlink  # noqa: E402

RING = 1 << 20
SIZES = (64, 4 << 10, 64 << 10, 1 << 20)  # the Rust bench's sizes


def python_sink(client: shmlink.Client, msg: bytes | np.ndarray, seconds: float) -> float:
    """Bytes per second `Session.send` streams `msg` into a sink session."""
    with client.open("sink", capacity=RING) as s:
        send: Callable[[object], None] = s.send  # type: ignore[assignment]
        n = 0
        start = time.perf_counter()
        while True:
            for _ in range(256):
                send(msg)
            n += 256
            if time.perf_counter() - start >= seconds:
                break
        s.finish()
        assert s.recv() is None
        elapsed = time.perf_counter() - start
        state = s.service_state()
    size = len(msg) if isinstance(msg, bytes) else msg.nbytes
    assert state["bytes"] == n * size, state
    return n * size / elapsed


def rust_sink(shmlink_cli: Path, address: str, quick: bool) -> dict[int, float]:
    """Bytes per second of the Rust client's `shmlink sink` rows, by message size."""
    args = [str(shmlink_cli), "bench", "--bus", address, "--only", "throughput", "--json"]
    if quick:
        args.append("--quick")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)["throughput"]
    return {int(r["size"]): float(r["bytes_per_sec"]) for r in rows if r["transport"] == "shmlink sink"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="per Python measurement")
    ap.add_argument("--full", action="store_true", help="the Rust bench without --quick")
    ap.add_argument("--all-sizes", action="store_true", help="64 B, 4 KiB, 64 KiB and 1 MiB (default: 64 KiB)")
    args = ap.parse_args()

    cli = find_binary("shmlink")
    broker = Broker([])
    print(f"shmlinkd {find_daemon()}\nshmlink  {cli}\nmodule   {shmlink._shmlink.__file__}")
    client = broker.client()
    sizes = SIZES if args.all_sizes else (64 << 10,)
    results: dict[int, dict[str, list[float]]] = {
        size: {"rust": [], "python bytes": [], "python numpy": []} for size in sizes
    }
    try:
        for r in range(args.rounds):
            rust = rust_sink(cli, broker.address, not args.full)
            for size in sizes:
                as_bytes = bytes(i % 251 for i in range(size))
                as_numpy = np.frombuffer(as_bytes, dtype=np.uint8).copy()
                res = results[size]
                res["rust"].append(rust[size])
                res["python bytes"].append(python_sink(client, as_bytes, args.seconds))
                res["python numpy"].append(python_sink(client, as_numpy, args.seconds))
                print(f"round {r + 1}, {size} B: " + ", ".join(f"{k} {v[-1] / 1e9:.2f} GB/s" for k, v in res.items()))
    finally:
        broker.stop()
    print(f"\nmedian of {args.rounds} rounds, messages into sink, 1 MiB rings, park mode:")
    for size, res in results.items():
        rust_median = statistics.median(res["rust"])
        for k, v in res.items():
            m = statistics.median(v)
            print(f"  {size:>8} B  {k:13} {m / 1e9:6.2f} GB/s  ({m / rust_median:.0%} of the Rust client)")


if __name__ == "__main__":
    main()
