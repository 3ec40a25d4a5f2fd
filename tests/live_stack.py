"""Real processes for the live cluster-stack test: a 2-node Ray cluster, PostgreSQL, an MLflow server, Prometheus.

Every process is started in its own session (process group) on 127.0.0.1 with free ports and its own folders
under one temporary directory, and `Stack.close()` ends them by process group (then any straggler whose command line
names this stack's folder, by pid). Nothing here attaches to a process it did not start, and nothing stops Ray
clusters by name (that would end other sessions' clusters too).

    stack = Stack(tmp_path); head = stack.ray_head(env); stack.ray_node(head, env); ...; stack.close()
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow
STACK_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest version)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(candidates[-1]) if candidates else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, what: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call ``check()`` until it returns something truthy; fail naming ``what`` (with the log's tail)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s\n{tail}")


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read()


@dataclasses.dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: Path


@dataclasses.dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    metrics_port: int
    temp_dir: Path


class Stack:
    """The processes of one live stack; `close()` ends them all."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, user: str | None = None):
        """Popen ``cmd`` in a new session, output to ``<root>/<name>.log``; as ``user`` via runuser."""
        log = self.root / f"{name}.log"
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        full_env = {**os.environ, **STACK_ENV, **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=self.root, start_new_session=True
            )
        self.procs.append(proc)
        return proc, log

    # -- Ray -------------------------------------------------------------------------------------------------------
    def _node_ports(self) -> list[str]:
        # own worker-port range: away from Ray's default 10002-19999 and below the ephemeral ports free_port() hands out
        base = random.randrange(20000, 32000, 200)
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={base}",
            f"--max-worker-port={base + 199}",
        ]

    def ray_head(self, env: dict[str, str], num_cpus: int = 1) -> RayHead:
        temp_dir = Path(f"/tmp/fotlab-stack-{os.getpid()}-{random.randrange(10**6)}")  # short: unix socket paths
        temp_dir.mkdir()
        self._ray_temp = temp_dir
        gcs_port, dashboard_port = free_port(), free_port()
        ports = self._node_ports()
        metrics_port = int(next(p for p in ports if p.startswith("--metrics-export-port")).split("=")[1])
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            *ports,
        ]
        proc, log = self.start("ray-head", cmd, env)
        url = f"http://127.0.0.1:{dashboard_port}"
        wait_for(lambda: http_get(f"{url}/api/gcs_healthz"), "the Ray head", 180, proc, log)
        head = RayHead(f"127.0.0.1:{gcs_port}", url, metrics_port, temp_dir)
        wait_for(lambda: self.alive_nodes(head) == 1, "the Ray head's node", 180, proc, log)
        return head

    def ray_node(
        self, head: RayHead, env: dict[str, str], num_cpus: int = 1, own_temp_dir: bool = True, name: str = "node"
    ) -> RayNode:
        """Another node on this host, `name` naming its log and its temp dir. With ``own_temp_dir`` (what a real
        second machine has) it does not share the head's session folder, whose runtime_resources/ the two nodes'
        runtime-env agents would both manage."""
        temp_dir = Path(f"{head.temp_dir}-{name}") if own_temp_dir else head.temp_dir
        alive_before = self.alive_nodes(head)
        cmd = [
            str(BIN / "ray"),
            "start",
            f"--address={head.gcs_address}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            *([f"--temp-dir={temp_dir}"] if own_temp_dir else []),
            *self._node_ports(),
        ]
        proc, log = self.start(f"ray-{name}", cmd, env)
        wait_for(lambda: self.alive_nodes(head) > alive_before, f"the Ray node {name!r}", 180, proc, log)
        return RayNode(proc, temp_dir)

    @staticmethod
    def alive_nodes(head: RayHead) -> int:
        nodes = json.loads(http_get(f"{head.dashboard_url}/nodes?view=summary"))["data"]["summary"]
        return sum(n["raylet"]["state"] == "ALIVE" for n in nodes)

    def kill_node(self, node: RayNode) -> None:
        """SIGKILL every process of `node` (a node lost with its machine): every descendant of its `ray start`
        (raylet, agents, and the Ray workers, whose process titles no longer name the node's folder), its process
        group, then anything still naming the node's own temp dir."""
        import psutil

        with _ignore_gone():
            tree = psutil.Process(node.proc.pid).children(recursive=True)
        with _ignore_gone():
            os.killpg(node.proc.pid, signal.SIGKILL)
        for child in tree:
            with _ignore_gone():
                child.kill()
        _kill_processes_naming(f"{node.temp_dir}/")
        node.proc.wait(timeout=30)

    # -- PostgreSQL + MLflow -----------------------------------------------------------------------------------------
    def postgres(self) -> str:
        """A throwaway PostgreSQL cluster (initdb as `postgres`); returns its SQLAlchemy URI for database mlflow."""
        # Its own folder outside pytest's (mode 0700, root's): the `postgres` user must reach the data directory.
        self._pg_root = Path(tempfile.mkdtemp(prefix="fotlab-stack-pg-"))
        self._pg_root.chmod(0o755)
        data = self._pg_root / "pgdata"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        init = subprocess.run(
            ["runuser", "-u", "postgres", "--", pg_bin("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr[-1000:]}")
        port = free_port()
        proc, log = self.start(
            "postgres",
            [pg_bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(data), "-c", "listen_addresses=127.0.0.1"],
            user="postgres",
        )

        def ready() -> bool:
            check = subprocess.run([pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True)
            return check.returncode == 0

        wait_for(ready, "PostgreSQL", 60, proc, log)
        subprocess.run([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"], check=True)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.1 defaults to psycopg 3

    def mlflow_server(self, backend_uri: str) -> str:
        port = free_port()
        artifacts = self.root / "mlflow-artifacts"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        proc, log = self.start("mlflow", cmd)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/health"), "the MLflow server", 240, proc, log)
        return url

    # -- Prometheus --------------------------------------------------------------------------------------------------
    def prometheus(self, head: RayHead, config_template: Path) -> str:
        """Prometheus with ``config_template`` (its discovery-file path pointed at this head's temp dir)."""
        port = free_port()
        discovery = head.temp_dir / "prom_metrics_service_discovery.json"
        text = config_template.read_text().replace("/tmp/ray/prom_metrics_service_discovery.json", str(discovery))
        text = text.replace("scrape_interval: 10s", "scrape_interval: 2s")
        config = self.root / "prometheus.yml"
        config.write_text(text)
        cmd = [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={self.root / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        proc, log = self.start("prometheus", cmd)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/-/ready"), "Prometheus", 60, proc, log)
        return url

    # -- teardown ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after a grace period."""
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
            for proc in self.procs:
                if proc.poll() is None:
                    with _ignore_gone():
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace_s
            while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                time.sleep(0.2)
        self._kill_stragglers()
        if getattr(self, "_pg_root", None) is not None:
            shutil.rmtree(self._pg_root, ignore_errors=True)

    def _kill_stragglers(self) -> None:
        """Ray processes that left their group (workers, agents) still name this stack's temp dir."""
        marker = str(getattr(self, "_ray_temp", "") or "")
        if not marker:
            return
        _kill_processes_naming(marker)
        if os.environ.get("FOTLAB_KEEP_STACK") != "1":  # keep the Ray logs for a look after a failure
            for folder in [Path(marker), *Path(marker).parent.glob(f"{Path(marker).name}-*")]:
                shutil.rmtree(folder, ignore_errors=True)


def _kill_processes_naming(marker: str) -> None:
    """SIGKILL every process whose command line contains `marker` (a folder only this stack's processes name)."""
    for pid_dir in Path("/proc").glob("[0-9]*"):
        with _ignore_gone():
            if marker in (pid_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(pid_dir.name), signal.SIGKILL)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import psutil

        gone = (ProcessLookupError, FileNotFoundError, PermissionError, psutil.NoSuchProcess)
        return exc_type is not None and issubclass(exc_type, gone)
