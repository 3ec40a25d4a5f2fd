"""Start or attach the Ray cluster a run uses.

Design choices:
- Local by default, one pinned cluster per host: ``ray.init()`` attaches to the cluster ``ray start --head`` runs
  on this host (or $RAY_ADDRESS) when there is one, else starts a local cluster for this driver. A recorded
  cluster that is dead (its head SIGKILLed or rebooted) is noticed in seconds and replaced by a local cluster,
  with one warning line; a dead $RAY_ADDRESS stops the run with one line. ``address``
  names a cluster explicitly (``ray://HEAD:10001``, ``HEAD:6379``). Two clusters on one host confuse Train V2.
- If Ray is already initialised in this process (tests share one session), it is reused: two clusters on one host
  confuse Train V2's placement-group cleaner.
- Environment defaults are set here, once, before Ray starts, never at import time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

logger = logging.getLogger(__name__)

# Defaults for a local, offline machine. Set only when the user has not set them.
LOCAL_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # Ray 2.60 turns token auth on for a local ray.init()
    "RAY_USAGE_STATS_ENABLED": "0",  # no phoning home
    # ray.train.report() blocks until the controller's next poll (default 2 s): poll often on local runs.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # The preemption watcher (one more actor process) follows node draining on cloud clusters; a local
    # single-node cluster is never drained, and on 2 cores the extra process delays the worker start.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# Set for every run: workers must keep the driver's working directory so relative paths keep their meaning.
RUN_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}


def apply_env_defaults(*, local: bool) -> None:
    """Set fotlab's Ray environment defaults in this process (propagated to the Train controller and workers)."""
    if local:
        for key, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for key, value in RUN_ENV.items():
        os.environ[key] = value


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Start a local Ray cluster or attach to ``address``; return the cluster's GCS address.

    Example: ``ensure_ray()`` (local), ``ensure_ray("auto")`` (the cluster ``ray start --head`` runs here).
    """
    import ray

    apply_env_defaults(local=address is None)
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    kwargs = dict(address=address, namespace="fotlab", log_to_driver=True)
    if address is None:
        kwargs.update(address=_local_address(), num_cpus=num_cpus)
    try:
        _check_reachable(address)
        ray.init(**kwargs)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not reach a Ray cluster at {address!r} ({err}). Start one with `ray start --head` "
            "or leave --address out to run on a local cluster."
        ) from err
    return ray.get_runtime_context().gcs_address


def start_train_coordinator() -> None:
    """Have Ray Train's autoscaling-coordinator actor started now, from a background thread.

    Ray Train V2's controller gets-or-creates this detached actor before it asks for the workers' resources, so its
    process would start only after the controller's. Asked for here, right after Ray is up, the two processes start
    side by side (about 1 s off a run on a 2-core machine). It is Ray's internal API: if it moves, the run only
    loses the head start.
    """

    def create() -> None:
        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            get_or_create_autoscaling_coordinator()
        except Exception as err:  # noqa: BLE001 - an optimisation only
            logger.debug("could not start Ray Train's autoscaling coordinator early: %s", err)

    threading.Thread(target=create, name="fotlab-train-coordinator", daemon=True).start()


def _local_address() -> str | None:
    """What a local ``ray.init`` should be given: None (Ray's own choice: $RAY_ADDRESS, else the cluster
    ``ray start --head`` recorded in its temp folder, else a new local cluster), or "local" when the recorded
    cluster is dead.

    A ``ray start --head`` that died (SIGKILL, a crash, a reboot) leaves its address in
    ``<ray temp dir>/ray_current_cluster``; ``ray.init()`` would then retry "Failed to connect to GCS" for minutes.
    A dead $RAY_ADDRESS is the user's explicit choice: that stops the run with one line saying what to do.
    """
    from ray._common.utils import get_ray_address_file

    env_address = os.environ.get("RAY_ADDRESS")
    if env_address:
        try:
            _check_reachable(env_address, timeout_s=2.0)
        except ConnectionError as err:
            raise ConnectionError(
                f"RAY_ADDRESS={env_address} names a Ray cluster that is not running ({err}); start it again, "
                "or unset RAY_ADDRESS to run on a local cluster"
            ) from None
        return None
    record = get_ray_address_file(None)
    try:
        with open(record) as handle:
            recorded = handle.read().strip()
    except OSError:
        return None  # no cluster recorded: Ray starts a local one
    try:
        _check_reachable(recorded, timeout_s=2.0)
    except ConnectionError as err:
        logger.warning(
            "the Ray cluster recorded in %s (%s) is dead (%s); starting a local cluster for this run "
            "(`ray stop` clears the stale record)",
            record,
            recorded,
            err,
        )
        return "local"
    return None


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast on a `HOST:PORT` / `ray://HOST:PORT` address nothing listens on (`ray.init` would keep retrying
    for minutes). "auto", "local" and no address are left to Ray."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port}: {err.strerror or err}") from None
