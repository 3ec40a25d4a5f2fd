"""R10: a `ray start --head` that was SIGKILLed leaves its address in Ray's temp folder; a local run must notice
within seconds and start its own cluster, saying so in one line.

The head runs with its own --temp-dir under a short tmp dir, and the local run is pointed at that folder through
RAY_TMPDIR (the variable Ray reads to find `ray_current_cluster`), so no other cluster on the host is touched.
Run: pytest tests/reliability/test_dead_cluster.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PROBE = """
import logging, time
logging.basicConfig(level=logging.WARNING, format="%(relativeCreated).0fms %(levelname)s %(name)s: %(message)s")
start = time.monotonic()
from fotlab.orchestrate.cluster import ensure_ray
address = ensure_ray(num_cpus=1)
print(f"CLUSTER {address} after {time.monotonic() - start:.1f}s", flush=True)
import ray
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our own temp dir): the dead head's processes only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dead_head():
    """A `ray start --head` in its own temp dir, SIGKILLed: yields (RAY_TMPDIR, the recorded address)."""
    base = Path(tempfile.mkdtemp(prefix="fr10", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    temp_dir = base / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    started = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--node-manager-port={_free_port()}",
         f"--object-manager-port={_free_port()}",],
        env=env, capture_output=True, text=True, timeout=180, start_new_session=True,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        record = temp_dir / "ray_current_cluster"
        recorded = record.read_text().strip()
        assert recorded.endswith(f":{port}"), recorded
        _kill(_pids_using(str(temp_dir)))
        deadline = time.monotonic() + 30
        while _pids_using(str(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert record.exists(), "the SIGKILLed head must leave its record behind (that is the fault)"
        yield base, recorded
    finally:
        _kill(_pids_using(str(temp_dir)))
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(300)
def test_local_run_starts_its_own_cluster_when_the_recorded_one_is_dead(dead_head):
    ray_tmpdir, recorded = dead_head
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240, start_new_session=True
    )
    elapsed = time.monotonic() - start
    assert probe.returncode == 0, probe.stderr[-3000:]
    stale_lines = [line for line in probe.stderr.splitlines() if "is dead" in line]
    assert len(stale_lines) == 1, probe.stderr[-3000:]
    assert recorded in stale_lines[0] and "starting a local cluster" in stale_lines[0]
    assert "Failed to connect to GCS" not in probe.stderr
    cluster = next(line for line in probe.stdout.splitlines() if line.startswith("CLUSTER "))
    assert recorded not in cluster, "the run must not attach to the dead cluster's address"
    detected_ms = float(stale_lines[0].split("ms ", 1)[0])  # since the probe's logging started (its first import)
    print(
        f"R10 measured: stale record {recorded} reported {detected_ms / 1000:.1f}s into the run; own cluster up, "
        f"{cluster}; wall {elapsed:.1f}s"
    )


@pytest.mark.timeout(60)
def test_a_dead_ray_address_stops_with_one_line(tmp_path):
    """$RAY_ADDRESS naming a dead cluster is an explicit choice: one line naming it and what to do, in seconds."""
    port = _free_port()  # nothing listens there
    code = (
        "from fotlab.orchestrate.cluster import ensure_ray\n"
        "try:\n    ensure_ray()\nexcept ConnectionError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": str(tmp_path)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50)
    elapsed = time.monotonic() - start
    line = next(line for line in out.stdout.splitlines() if line.startswith("ERR"))
    assert f"RAY_ADDRESS=127.0.0.1:{port}" in line and "unset RAY_ADDRESS" in line
    print(f"R10 measured: dead RAY_ADDRESS reported in {elapsed:.1f}s")
