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


def run_processes(n: int, model_parallel: int = 1, n_devices: int = 1) -> dict:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(port), str(n), str(i), str(model_parallel)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
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


def test_model_axis_sharding_equals_one_device():
    """4 CPU devices in one process, mesh (data 2, model 2): weights split over "model" (Megatron layout), rows over
    "data"; one train step gives the single-device loss, gradient norm and weights."""
    sharded = run_processes(1, model_parallel=2, n_devices=4)
    one = run_processes(1)
    assert sharded["devices"] == 4 and sharded["n_sharded_params"] > 0 and one["n_sharded_params"] == 0
    assert sharded["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert sharded["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert sharded["checksum"] == pytest.approx(one["checksum"], rel=1e-6)
