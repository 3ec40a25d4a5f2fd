"""Metric points into one MLflow run: exactly once per (metric key, step), and training never waits for the server.

    delivery = MetricDelivery(run_id, uri, send=log_batch_of_points)   # what `fotlab.tracking.TrackedRun` holds
    delivery.start_background(out_dir, flush_timeout_s=180, logged={"train/loss": 40})   # marks: what the run has
    delivery.log({"train/loss": 2.3}, step=41)   # returns at once
    delivery.settle()   # at the end: a bounded wait; what did not arrive goes to out_dir/undelivered_metrics.jsonl

This module imports nothing from MLflow: `fotlab.tracking` gives it the sending callable.

Design choices:
- Exactly once per key and step: `StepMarks` holds the highest step logged per metric key, and a point at or below
  its key's mark is dropped. A run that starts again (a `--resume`, a Ray restart) takes its marks from what the
  MLflow run holds (MLflow keeps each key's latest point, the one at its highest step: one `get_run` gives them
  all), so re-trained steps and re-run evaluations add nothing, while a point that never arrived (a crash between
  a step's train/loss and its val/loss) is logged when its step comes round again.
- Training never blocks on the tracking server: points go to an outbox that a daemon thread sends in batches, in
  order. While the server does not answer a quick health probe (so no request sits in MLflow's own HTTP retries,
  minutes by default) or a send fails, the points stay queued and the thread retries with capped exponential
  backoff; the caller bounds the total wait (`settle`, `tracking.flush_timeout_s`).
- A journal file beside the run's checkpoints gets every submitted point before the thread sees it, and is emptied
  whenever the queue drains: a process killed with points still queued leaves them there for the next start of
  the run. It also bounds memory: past `max_pending` queued points (a long outage) the newest live only in the
  journal and are read back as the backlog drains.
- Once `settle` gives up (or a quick probe at the run's end finds the server down), the run is offline: no more
  calls to the server; the undelivered points, the tags, the model to log and the run's end go to an
  `undelivered.UndeliveredFile` for `fotlab runs deliver FILE`.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fotlab.undelivered import UNDELIVERED_FILE, Point, UndeliveredFile, read_points

logger = logging.getLogger(__name__)

JOURNAL_FILE = "metrics_outbox.jsonl"  # in the run's output folder: points not confirmed delivered yet
MAX_PENDING = 100_000  # queued points kept in memory (~20 MB); more wait in the journal
BATCH_SIZE = 1000  # points per `log_batch` request (MLflow's limit)
BACKOFF_S = (0.5, 10.0)  # first and longest wait between two tries while the server is down
PROBE_TIMEOUT_S = 3.0  # a tracking server that does not answer its /health within this is taken as down


class StepMarks:
    """The highest step logged per metric key; `keep` lets through only points above their key's mark (and raises
    it). Used from one thread (the one that logs)."""

    def __init__(self, marks: Mapping[str, int] | None = None) -> None:
        self._marks = dict(marks or {})

    def keep(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> list[Point]:
        """Points for the metrics whose key has nothing logged at `step` or later."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        return self.keep_points(Point(key, float(value), int(step), now) for key, value in metrics.items())

    def keep_points(self, points: Iterable[Point]) -> list[Point]:
        kept = []
        for point in points:
            mark = self._marks.get(point.key)
            if mark is None or point.step > mark:
                self._marks[point.key] = point.step
                kept.append(point)
        return kept


def logged_steps(run) -> dict[str, int]:
    """Each metric key of an MLflow run (`mlflow.entities.Run`) -> its highest logged step. MLflow keeps one latest
    point per key, chosen by step first (then timestamp), so the run's own metrics carry it."""
    return {m.key: int(m.step) for m in run.to_proto().data.metrics}


class MetricOutbox:
    """Points on their way to the server: `submit` never blocks on it; a daemon thread sends them (see the module
    doc). `send(points)` logs one batch (raises on failure); `reachable()` is a quick probe of the server;
    `rejected(exc)` tells a refusal no retry can fix (a 4xx answer): that batch is set aside, not retried."""

    def __init__(
        self,
        send: Callable[[list[Point]], None],
        journal: Path,
        *,
        reachable: Callable[[], bool] = lambda: True,
        rejected: Callable[[BaseException], bool] = lambda exc: False,
        max_pending: int = MAX_PENDING,
        backoff_s: tuple[float, float] = BACKOFF_S,
    ) -> None:
        self._send, self._reachable, self._rejected = send, reachable, rejected
        self._max_pending, self._backoff_s = max_pending, backoff_s
        self._journal = Path(journal)
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        self._journal_out = self._journal.open("a", encoding="utf-8")
        self._pending: collections.deque[Point] = collections.deque()
        self._spilled = False  # queued points past max_pending live only in the journal
        self._sent: dict[str, int] = {}  # highest step handled per key (a key's points are sent in step order)
        self._set_aside: list[Point] = []  # batches the server refused
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self.n_delivered = 0
        self.down_since: float | None = None  # monotonic time of the first failed try of the current outage
        self.last_error: str | None = None
        threading.Thread(target=self._run, name="fotlab-metric-delivery", daemon=True).start()

    def submit(self, points: list[Point]) -> None:
        """Queue points (journal first); returns at once."""
        if not points:
            return
        with self._cond:
            self._journal_out.write("".join(json.dumps(p.to_json()) + "\n" for p in points))
            self._journal_out.flush()  # in the OS's hands: survives this process being killed
            if self._spilled or len(self._pending) + len(points) > self._max_pending:
                self._spilled = True
            else:
                self._pending.extend(points)
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every point submitted so far was delivered (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._spilled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def undelivered(self) -> list[Point]:
        """Every point submitted and not delivered (the batch being sent, if any, included)."""
        with self._cond:
            queued = self._backlog() if self._spilled else list(self._pending)
            return self._set_aside + queued

    def stop(self) -> None:
        """No more sending (the thread ends after the try it is in, if any). The journal is closed, and removed when
        nothing is queued (else it stays for the next start of the run)."""
        with self._cond:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self._cond.notify_all()
            self._journal_out.close()
            if not (self._pending or self._spilled):
                self._journal.unlink(missing_ok=True)

    # -- the sending thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self._backoff_s[0]
        while not self._stopped.is_set():
            with self._cond:
                while not (self._pending or self._spilled or self._stopped.is_set()):
                    self._cond.wait()
                if self._stopped.is_set():
                    return
                if not self._pending:
                    self._reload()
                batch = list(itertools.islice(self._pending, BATCH_SIZE))
            if self._try(batch):
                delay = self._backoff_s[0]
            else:
                self._stopped.wait(delay)
                delay = min(2 * delay, self._backoff_s[1])

    def _try(self, batch: list[Point]) -> bool:
        """Send one batch; False when it has to wait for another try."""
        try:
            if not self._reachable():
                raise ConnectionError("no answer to a health probe")
            self._send(batch)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the points, try again later
            if not self._rejected(exc):
                self._note_down(exc)
                return False
            logger.warning("the tracking server refused %d metric points (%s); not sent again", len(batch), exc)
            self._set_aside.extend(batch)
        with self._cond:
            if self._stopped.is_set():  # stopped while sending: the queue is someone else's now
                return True
            for point in batch:
                self._pending.popleft()
                self._sent[point.key] = point.step
            self.n_delivered += len(batch)
            if not (self._pending or self._spilled):
                self._journal_out.truncate(0)  # append mode: later writes start again at the new end
            self._cond.notify_all()
        if self.down_since is not None:
            logger.warning(
                "tracking server answers again after %.0f s: sending the metrics kept meanwhile",
                time.monotonic() - self.down_since,
            )
            self.down_since = None
        return True

    def _note_down(self, exc: BaseException) -> None:
        self.last_error = " ".join(str(exc).split())[:300] or type(exc).__name__
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "metrics cannot reach the tracking server (%s); training goes on, they are kept and sent when it "
                "answers again",
                self.last_error,
            )

    def _backlog(self) -> list[Point]:
        """The journal's points not handled yet (called with the lock held)."""
        return [p for p in read_points(self._journal) if p.step > self._sent.get(p.key, -(2**62))]

    def _reload(self) -> None:
        """Refill the empty in-memory queue from the journal (called with the lock held, when spilled)."""
        backlog = self._backlog()
        self._pending.extend(backlog[: self._max_pending])
        self._spilled = len(backlog) > self._max_pending


def server_reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """False when `uri` is an MLflow server (http, https) that does not answer a GET of its /health within
    timeout_s; True for any answer (even an error status) and for local stores (sqlite, files)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


class MetricDelivery:
    """The path from one run's `log_metrics` to its server: the marks, then (after `start_background`) the outbox,
    or once offline the undelivered file. `send(points)` logs one batch synchronously (raises on failure);
    `send_once`, when given, is what the outbox uses: one try, no retries of its own (the outbox retries)."""

    def __init__(
        self,
        run_id: str,
        uri: str,
        send: Callable[[list[Point]], None],
        send_once: Callable[[list[Point]], None] | None = None,
    ) -> None:
        self.run_id, self.uri, self._send = run_id, uri, send
        self._send_once = send_once or send
        self.marks = StepMarks()
        self.outbox: MetricOutbox | None = None
        self.output_dir: Path | None = None  # the journal and an undelivered file go here
        self.flush_timeout_s = 0.0
        self.undelivered: UndeliveredFile | None = None  # set once the server is given up on

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        points = self.marks.keep(metrics, step)
        if self.undelivered is not None:
            self.undelivered.add(points)
            self.undelivered.save()
        elif self.outbox is not None:
            self.outbox.submit(points)
        else:
            self._send(points)

    def start_background(
        self,
        output_dir: str | Path,
        flush_timeout_s: float,
        logged: Mapping[str, int],
        rejected: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        """Send from a daemon thread from now on, with marks `logged` (what the run holds) and the journal in
        `output_dir`; first what an earlier process of this run left there unsent (its journal, its undelivered
        file) and the run lacks."""
        self.output_dir, self.flush_timeout_s = Path(output_dir), float(flush_timeout_s)
        self.marks = StepMarks(logged)
        journal, earlier = self.output_dir / JOURNAL_FILE, self.output_dir / UNDELIVERED_FILE
        leftovers = sorted(read_points(journal) + read_points(earlier), key=lambda p: p.step)
        self.outbox = MetricOutbox(
            self._send_once, journal, reachable=lambda: server_reachable(self.uri), rejected=rejected
        )
        self.outbox.submit(self.marks.keep_points(leftovers))
        earlier.unlink(missing_ok=True)  # its points are queued again (and journaled)

    def settle(self) -> UndeliveredFile | None:
        """Wait, at most `flush_timeout_s`, until the points logged so far have reached the server. If some have not,
        go offline: they are saved (`undelivered_metrics.jsonl` in the output folder) and that file returned."""
        if self.undelivered is None and self.outbox is not None and not self.outbox.flush(self.flush_timeout_s):
            self.go_offline(self.outbox.last_error or "the tracking server did not answer in time")
        return self.undelivered

    def end(self) -> UndeliveredFile | None:
        """The last `settle` of a process that logged in the background; then the sending thread stops."""
        undelivered = self.settle()
        if self.outbox is not None:
            self.outbox.stop()
            self.outbox = None
        return undelivered

    def check_offline(self) -> bool:
        """True once the server is given up on; when it was not, asks it first (a quick probe) and gives up on it
        if it does not answer."""
        if self.undelivered is None and not server_reachable(self.uri):
            self.go_offline(f"the tracking server {self.uri} does not answer")
        return self.undelivered is not None

    def go_offline(self, reason: str, path: Path | None = None) -> None:
        """Stop calling the server: the undelivered points go to `path` (default: the output folder's
        undelivered_metrics.jsonl; a file another process of the run wrote there is kept and added to)."""
        points = []
        if self.outbox is not None:
            self.outbox.stop()
            points = self.outbox.undelivered()
        folder = self.output_dir or Path(tempfile.gettempdir()) / "fotlab" / self.run_id
        self.undelivered = UndeliveredFile.create(
            path or folder / UNDELIVERED_FILE, self.run_id, self.uri, points, reason
        )
        self.undelivered.save()

    def record(self, **fields) -> None:
        """Offline: note what the run meant to do (`tags`, `model`, `end`: see UndeliveredFile) in the file."""
        file = self.undelivered
        assert file is not None, "record() is for an offline run"
        file.tags.update(fields.pop("tags", {}))
        for name, value in fields.items():
            setattr(file, name, value)
        file.save()
