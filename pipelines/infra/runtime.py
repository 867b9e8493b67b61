"""Ray start-up shared by every command: a running cluster when ``RAY_ADDRESS`` is set, else a quiet local one."""
from __future__ import annotations

import logging
import math
import os
import sys

import ray

from pipelines.infra.net import connect_error
from spai_core.errors import UserError

logger = logging.getLogger(__name__)

# Polls Ray's State API, which needs the dashboard that a local Ray here does not start (it needs ray[default]):
# without one it warns every few seconds for the whole run and never sees its controller die, so what it would remove
# remove_orphaned_placement_groups does. With a dashboard its queries succeed, so raising its level hides nothing on
# a cluster but a flaky State API.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Data says which progress display it picked, and how to turn on the bars we turn off for our own
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Ray Train logs each worker's every report (its whole metrics dict) under a logger named by the module's file path,
# outside "ray.train", so its LoggingConfig does not reach it
TRAIN_REPORT_LOGGER = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
# Ray Train's watcher of draining nodes: a cluster drains nodes before it takes them away (spot instances, scale-down),
# a local Ray never does. Its actor's restart policy makes Ray log an error-level line at every run start.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class ClusterError(UserError, ConnectionError):
    """``RAY_ADDRESS`` names a cluster this machine cannot reach."""


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
    if not sys.stdout.isatty():  # Ray colours the prefix of each worker line it forwards; a log file keeps the codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = os.environ.get("RAY_ADDRESS")
    runtime_env: dict = {"worker_process_setup_hook": setup_worker}
    if address:  # "auto" joins a cluster started on this machine with `ray start`
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        except ConnectionError as exc:  # reachable, but it would not take us: most often Ray's token authentication
            raise ClusterError(f"could not join the Ray cluster at {address} (RAY_ADDRESS): {exc}. If it uses token "
                               "authentication (`ray start` turns it on since Ray 2.5x), set RAY_AUTH_MODE=token and "
                               "give this machine the cluster's token: "
                               "https://docs.ray.io/en/latest/ray-security/token-auth.html") from exc
    else:  # always a fresh local Ray: silently joining some other job's cluster would mix resources and logs
        cpus = max(os.cpu_count() or 1, math.ceil(reserved_cpus) + 2)
        runtime_env["env_vars"] = {PREEMPTION_WATCHER_ENV: "0"}
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True, runtime_env=runtime_env)
    quiet_ray_logs()


def local_capacity() -> tuple[int, int] | None:
    """(CPU cores, GPUs) of this machine when :func:`init_ray` would start a local Ray on it; None when it joins a
    cluster (``RAY_ADDRESS``) or Ray is already up. What a job asks of a local Ray is checked against this before
    starting it: Ray would start every worker process it is asked for, however few cores there are, and wait forever
    for GPUs it lacks."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return None
    import torch

    return os.cpu_count() or 1, torch.cuda.device_count()


def node_cpus() -> list[float]:
    """CPUs of each alive node of the Ray cluster: what sizes work that must fit on one node (actors, trials)."""
    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]


def check_gpus(needed: float, asked: str) -> None:
    """Refuse GPUs that a local Ray does not have (its actors would wait for them forever). On a cluster
    (``RAY_ADDRESS``) only say that the job waits: a cluster that scales GPU nodes from zero (as ``cluster.yaml``'s
    does) has none until a job asks for them."""
    have = ray.cluster_resources().get("GPU", 0.0)
    if have >= needed:
        return
    if os.environ.get("RAY_ADDRESS"):
        logger.warning("%s needs %g GPU(s) and the Ray cluster has %g now: waiting for its autoscaler to add GPU "
                       "nodes (Ctrl-C if it has none to add)", asked, needed, have)
        return
    raise ClusterError(f"{asked} needs {needed:g} GPU(s) but the local Ray has {have:g}; ask for fewer, drop the GPU "
                       "options to run on CPU, or set RAY_ADDRESS to a Ray cluster with GPUs")


def remove_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creator, an actor, has died; returns how many.

    Ray keeps a placement group until its creator actor *and* its job have ended. A Tune trial that ASHA stops is
    killed with the Train run inside it, whose worker group's placement group then holds its CPUs until the driver
    exits: on a small cluster the next trials, and any job after the search in the same process, wait for CPUs
    forever. Ray Train's own cleaner actor does this through the State API, which only a Ray with a dashboard serves.
    Only this job's groups are touched, and of those not the driver's own or detached ones."""
    from ray._private.state import state  # the GCS table: the public one does not say who created a group
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id()).binary()
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = PlacementGroupTableData.FromString(raw)
        if (group.creator_job_id != job or group.state == PlacementGroupTableData.REMOVED or group.is_detached
                or not group.creator_actor_dead or ray.ActorID(group.creator_actor_id).is_nil()):
            continue
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
        removed += 1
    if removed:
        logger.info("removed %d placement group(s) of ended actors (stopped trials' Train workers)", removed)
    return removed


def setup_worker() -> None:
    """Ray's setup hook of every worker process: quiet logs, and the GCS address of the cluster it belongs to.

    Ray Train's placement-group cleaner (an actor) finds its cluster through the State API, which without an address
    looks for running Ray instances on the machine; with a second local Ray there it finds two and dies with a long
    traceback. The worker's own GCS address settles it.
    """
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_ray_logs()


def quiet_ray_logs() -> None:
    """Keep Ray's routine INFO lines off the console, in the driver and (as Ray's worker setup hook) in every worker.

    Ray Data logs each dataset's plan, start and end (a dozen lines per training epoch) and, without a terminal, a
    progress table every 10 s; our own progress lines say what matters. Ray Data's log file under the session folder
    (``/tmp/ray/session_latest/logs/ray-data``) keeps those; the three loggers named above are raised outright (their
    lines are noise here, or repeat what the epoch lines and MLflow hold). Warnings still reach the console.
    """
    import ray.data  # configures the "ray.data" logger on its first import, which would undo a change made before

    for handler in logging.getLogger(ray.data.__name__).handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    logging.getLogger(TRAIN_REPORT_LOGGER).setLevel(logging.WARNING)
