"""Ray start-up shared by every command: a running cluster when ``RAY_ADDRESS`` is set, else a quiet local one."""
from __future__ import annotations

import math
import os
import socket

import ray

from spai_core.errors import UserError

CONNECT_TIMEOUT_S = 10.0


class ClusterError(UserError, ConnectionError):
    """``RAY_ADDRESS`` names a cluster this machine cannot reach."""


def connect_error(host: str, port: int) -> OSError | None:
    """Why a TCP connection to ``host:port`` fails within :data:`CONNECT_TIMEOUT_S`, or None when it opens.

    For services whose clients retry for minutes before saying anything (Ray's GCS client, MLflow's HTTP client).
    """
    try:
        socket.create_connection((host.strip("[]"), port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return exc
    return None


def check_reachable(address: str) -> None:
    """Fail fast on an unreachable ``host:port`` (``ray://`` too). ``auto`` and addresses without a port are left to
    Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit() and (exc := connect_error(host, int(port))):
        raise ClusterError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {exc}; check the address and "
                           "that its head node is up, or unset RAY_ADDRESS to run on a local Ray") from exc


def init_ray(reserved_cpus: float = 0) -> None:
    """Connect to ``RAY_ADDRESS`` (a cluster, or ``auto``) or start a new local Ray; a no-op when Ray is already up.

    ``reserved_cpus`` is what long-lived actors (training workers, scoring actors) hold for the whole job. Ray Data
    tasks that feed them need CPU slots too, or the pipeline waits forever for a slot that the actors hold; so a
    local Ray advertises at least two logical CPUs beyond the reservation (the OS shares the real cores).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # "auto" joins a cluster started on this machine with `ray start`
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:  # always a fresh local Ray: silently joining some other job's cluster would mix resources and logs
        cpus = max(os.cpu_count() or 1, math.ceil(reserved_cpus) + 2)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
