"""The small live link between the driver and the training workers.

Workers push the metrics they log (rank 0 only) and ask whether the driver wants them to stop; the driver
drains metrics for the progress display and requests a graceful stop on Ctrl-C. On a Ray run the channel is a
zero-CPU actor pinned to the driver's node (left to Ray, it can land on a worker node, and a run whose channel
died with that node failed every restart); on an in-process run (``num_workers=0``) it is the plain object.
The channel is a convenience, never a reason to fail training: a worker that cannot reach it logs a warning once
and trains on (no live metrics, no graceful stop).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

MAX_BUFFERED = 1000  # metric records kept for the display when it falls behind (oldest dropped)


class RunChannel:
    """Metrics from rank 0 to the driver, and a stop request from the driver to all ranks."""

    def __init__(self) -> None:
        self._records: collections.deque = collections.deque(maxlen=MAX_BUFFERED)
        self._stop = False
        self._lock = threading.Lock()

    def push(self, step: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._records.append((int(step), dict(metrics)))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        with self._lock:
            records = list(self._records)
            self._records.clear()
        return records

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class ChannelHandle:
    """Calls a `RunChannel` the same way whether it is a local object or a Ray actor handle (picklable)."""

    def __init__(self, target: Any, is_actor: bool) -> None:
        self.target = target
        self.is_actor = is_actor
        self.lost = False  # a worker found the actor gone (its node died): it stops asking

    @classmethod
    def create(cls, *, use_ray: bool) -> ChannelHandle:
        if not use_ray:
            return cls(RunChannel(), is_actor=False)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(RunChannel).options(num_cpus=0, max_concurrency=4, scheduling_strategy=here).remote()
        return cls(actor, is_actor=True)

    def push(self, step: int, metrics: dict[str, float]) -> None:
        """Fire and forget: never blocks the training step."""
        if self.lost:
            return
        if self.is_actor:
            self.target.push.remote(step, metrics)
        else:
            self.target.push(step, metrics)

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        return self._call("drain")

    def request_stop(self) -> None:
        self._call("request_stop")

    def stop_requested(self) -> bool:
        """Whether the driver asked for a graceful stop (False when the channel is gone)."""
        if self.lost:
            return False
        try:
            return bool(self._call("stop_requested"))
        except Exception as error:  # noqa: BLE001 -- any Ray error reaching the actor: train on without it
            self.lost = True
            logger.warning("the run's channel to the driver is gone (%s): no live metrics or graceful stop", error)
            return False

    def close(self) -> None:
        if self.is_actor:
            import ray

            ray.kill(self.target, no_restart=True)

    def _call(self, name: str):
        if self.is_actor:
            import ray

            return ray.get(getattr(self.target, name).remote(), timeout=30)
        return getattr(self.target, name)()
