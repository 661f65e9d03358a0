"""asyncio sessions: recv is driven by the session's fds on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from broker import Broker

import shmlink


def test_recv_waits_on_the_loop_without_a_thread(broker: Broker) -> None:
    async def main() -> None:
        s = shmlink.AsyncSession(broker.client().open("echo"))
        threads = threading.active_count()
        loop = asyncio.get_running_loop()
        # Sent from a loop callback while recv waits: only the session's
        # eventfd can wake it (the ring had room, so send returns at once).
        loop.call_later(0.05, s.session.send, b"later")
        start = time.monotonic()
        assert await s.recv() == b"later"
        assert time.monotonic() - start >= 0.05
        assert threading.active_count() == threads
        s.session.close()

    asyncio.run(main())


def test_echo_with_concurrent_sender_and_receiver(broker: Broker) -> None:
    messages = [bytes([i % 256]) * (i * 997 % 200_000) for i in range(200)]

    async def main() -> None:
        async with await shmlink.Client(broker.address).open_async("echo", capacity=1 << 16) as s:

            async def sender() -> None:
                for m in messages:
                    await s.send(m)
                await s.finish()

            async def receiver() -> list[bytes]:
                return [m async for m in s]

            _, got = await asyncio.gather(sender(), receiver())
            assert got == messages

    asyncio.run(asyncio.wait_for(main(), 60))


def test_async_iteration_of_source(broker: Broker) -> None:
    async def main() -> list[bytes]:
        client = shmlink.Client(broker.address)
        s = await client.open_async("source", options={"count": 4, "message-size": 100})
        async with s:
            return [m async for m in s]

    got = asyncio.run(main())
    assert got == [bytes((i + j) % 251 for j in range(100)) for i in range(4)]


def test_recv_timeout(broker: Broker) -> None:
    async def main() -> None:
        client = shmlink.Client(broker.address)
        async with await client.open_async("echo", timeout=0.1) as s:
            start = time.monotonic()
            with pytest.raises(shmlink.TimeoutError):
                await s.recv()
            assert time.monotonic() - start >= 0.1
            await s.send(b"after")
            assert await s.recv() == b"after"

    asyncio.run(main())


def test_ended_by_the_broker_wakes_a_waiting_recv(broker: Broker) -> None:
    async def main() -> None:
        client = shmlink.Client(broker.address)
        s = await client.open_async("echo")
        receiving = asyncio.ensure_future(s.recv())
        await asyncio.sleep(0)  # yield once: the task runs up to its wait
        assert not receiving.done()
        other = shmlink.Client(broker.address)
        await asyncio.get_running_loop().run_in_executor(None, other.close_session, s.path)
        with pytest.raises(shmlink.ClosedError):
            await asyncio.wait_for(receiving, 10)

    asyncio.run(main())


def test_one_receiver_at_a_time(broker: Broker) -> None:
    async def main() -> None:
        client = shmlink.Client(broker.address)
        async with await client.open_async("echo") as s:
            first = asyncio.ensure_future(s.recv())
            await asyncio.sleep(0)  # yield once: the task runs up to its wait
            with pytest.raises(RuntimeError, match="already receiving"):
                await s.recv()
            await s.send(b"one")
            assert await first == b"one"

    asyncio.run(main())


def test_open_async_refused(broker: Broker) -> None:
    async def main() -> None:
        with pytest.raises(shmlink.UnknownServiceError):
            await shmlink.Client(broker.address).open_async("nope")

    asyncio.run(main())
