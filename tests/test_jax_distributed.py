"""Two-process data parallel JAX on CPU (jax.distributed on 127.0.0.1, gloo collectives): one train step over
a global batch fed half by each process gives the loss, gradient norm and updated weights of one process with
the whole batch (same crossbatch groups)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SCRIPT = Path(__file__).with_name("jax_dp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int) -> dict:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(port), str(n), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def test_two_processes_equal_one_process_with_the_whole_batch():
    two = run_processes(2)
    one = run_processes(1)
    assert two["devices"] == 2 and one["devices"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["checksum"] == pytest.approx(one["checksum"], rel=1e-6)
