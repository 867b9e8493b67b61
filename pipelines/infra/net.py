"""A TCP reachability check for services whose clients retry for a long time before saying anything."""
from __future__ import annotations

import socket

CONNECT_TIMEOUT_S = 10.0


def connect_error(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> OSError | None:
    """Why a TCP connection to ``host:port`` fails within ``timeout`` seconds, or None when it opens.

    For services whose clients retry for minutes before saying anything (Ray's GCS client, MLflow's HTTP client, the
    S3 client on a dead endpoint).
    """
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError as exc:
        return exc
    return None
