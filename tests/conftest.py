from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mqtt_broker import Broker, start_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real mosquitto on a free loopback port, shared by the session."""
    b = start_broker()
    yield b
    b.stop()
