"""The file of what a run could not deliver to its tracking server: `<output>/undelivered_metrics.jsonl`.

    file = UndeliveredFile.load("runs/quick-20260101-000000-abc123/output/undelivered_metrics.jsonl")
    file.summary()   # "37 metric points of 8 keys (lr, train/loss, ...)"

Line 1 is a header (JSON): the run id and tracking URI, why the server was given up on, and what the run meant to
do once its metrics were in: its tags, its model folder (and registered-model name), its end (status, final
metrics, error). Every later line is one metric point, `{"key", "value", "step", "timestamp"}`. The file is
written atomically (a temporary file beside it, synced, renamed over it), so a reader never sees half of one.
`fotlab runs deliver FILE` (`fotlab.cli_runs.deliver`) sends it; `fotlab run` names it when it ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fotlab.errors import FotlabError

UNDELIVERED_FILE = "undelivered_metrics.jsonl"  # in the run's output folder
FILE_KIND = "fotlab-undelivered-metrics"


class DeliveryFileError(FotlabError):
    """An undelivered-metrics file that cannot be read."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One metric point as MLflow stores it (timestamp in ms since the epoch: when it was logged, not sent)."""

    key: str
    value: float
    step: int
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Point:
        return cls(str(data["key"]), float(data["value"]), int(data["step"]), int(data["timestamp"]))


def read_points(path: Path) -> list[Point]:
    """The point lines of a file (a journal, an undelivered file: its header is skipped); a line cut short by a
    kill is skipped too."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    points = []
    for line in lines:
        try:
            data = json.loads(line)
            if isinstance(data, dict) and "key" in data:
                points.append(Point.from_json(data))
        except (ValueError, KeyError, TypeError):
            continue
    return points


@dataclasses.dataclass
class UndeliveredFile:
    """What a run could not deliver, saved for `fotlab runs deliver FILE` (module doc).

    points: metric points not in the run, as far as the run could tell;
    end: how the run ended, recorded once the points are in ({"status", "step", "metrics", "error"});
    tags: tags the run meant to set; model: the model folder it meant to log ({"dir", "step", "name",
    "register_as"}).
    """

    path: Path
    run_id: str
    tracking_uri: str
    reason: str
    points: list[Point] = dataclasses.field(default_factory=list)
    end: dict[str, Any] | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    model: dict[str, Any] | None = None

    @classmethod
    def create(cls, path: Path, run_id: str, tracking_uri: str, points: list[Point], reason: str) -> UndeliveredFile:
        """A new file for the run, or the one already at `path` for it (another process of the run wrote it: its
        rank-0 worker, when the driver gives up too) with these points added."""
        if Path(path).is_file():
            try:
                found = cls.load(path)
            except DeliveryFileError:
                found = None
            if found is not None and found.run_id == run_id:
                found.add(points)
                return found
        return cls(Path(path), run_id, tracking_uri, reason, list(points))

    def add(self, points: Iterable[Point]) -> None:
        known = {(p.key, p.step) for p in self.points}
        self.points += [p for p in points if (p.key, p.step) not in known]

    @property
    def keys(self) -> list[str]:
        return sorted({p.key for p in self.points})

    def summary(self) -> str:
        """`37 metric points of 10 keys (train/grad_norm, train/loss, ... val/loss, +2 more)` (at most 8 named)."""
        keys = self.keys
        if not keys:
            return "no metric points"
        shown = ", ".join(keys[:8]) + (f", +{len(keys) - 8} more" if len(keys) > 8 else "")
        return f"{len(self.points)} metric points of {len(keys)} keys ({shown})"

    def save(self) -> None:
        header = {
            "kind": FILE_KIND,
            "version": 1,
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "reason": self.reason,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "end": self.end,
            "tags": self.tags,
            "model": self.model,
        }
        lines = [json.dumps(header)] + [json.dumps(p.to_json()) for p in self.points]
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> UndeliveredFile:
        path = Path(path)
        try:
            with path.open(encoding="utf-8") as f:
                header = json.loads(f.readline())
        except OSError as exc:
            raise DeliveryFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("kind") != FILE_KIND:
            raise DeliveryFileError(f"{path}: not an undelivered-metrics file written by `fotlab run`")
        return cls(
            path,
            str(header["run_id"]),
            str(header["tracking_uri"]),
            str(header.get("reason") or ""),
            read_points(path),
            header.get("end"),
            dict(header.get("tags") or {}),
            header.get("model"),
        )
