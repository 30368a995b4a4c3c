"""The API client when the server cannot be reached."""

from __future__ import annotations

import time

import pytest

from ml_platform.client import ApiClientError, Client
from tests.services import free_port

pytestmark = pytest.mark.unit


def test_a_server_never_reached_fails_at_once_and_a_write_is_never_repeated() -> None:
    """A wrong address is not waited for (the wait is for a server that answered before and
    is restarting, see test_server); nor is a write to a server gone away: it fails."""
    client = Client(f"http://127.0.0.1:{free_port()}", on_wait=pytest.fail)
    began = time.monotonic()
    with pytest.raises(ApiClientError, match="cannot reach") as first:
        client.run("0" * 32)
    assert first.value.code == "unreachable" and time.monotonic() - began < 5
    client._reached = True  # as if it had answered before
    with pytest.raises(ApiClientError, match="cannot reach"):
        client.cancel("0" * 32)  # a POST: not asked again (on_wait would fail the test)
    client.close()
