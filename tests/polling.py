"""Helpers for the tests that wait on subprocesses, servers and clusters: a free port, and polling."""
from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that nothing listens on right now, on every interface (so also on 127.0.0.1 and this machine's
    address, where a Ray head listens); also handy as an unreachable endpoint."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """Call ``condition`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
