"""Fixtures: a private dbus-daemon and a shmlinkd child per test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from broker import Broker

import shmlink


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A private bus and daemon shared by the tests of one module."""
    b = Broker([])
    yield b
    b.stop()


@pytest.fixture()
def client(broker: Broker) -> shmlink.Client:
    """A new connection to the module's broker."""
    return broker.client()


@pytest.fixture()
def make_broker() -> Iterator[Callable[..., Broker]]:
    """Starts brokers with their own flags or configuration; stops them after the test."""
    started: list[Broker] = []

    def make(extra_args: tuple[str, ...] = (), config: str | None = None) -> Broker:
        b = Broker(list(extra_args), config)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()
