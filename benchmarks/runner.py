"""The benchmark runner: every case runs in a fresh subprocess, cases are interleaved per repeat, medians and
ratios go in one table.

Design choices:
- One subprocess per (case, repeat): peak RSS (`ru_maxrss`) is then the case's own, and no case warms caches or
  the allocator for the next. The child prints one JSON line; the parent keeps only that.
- Timing: the compared metric is the CPU time of the timed region (`process_time`, all threads), by default
  with ONE math thread per case: on a shared, busy machine wall time mostly measures the neighbours (two
  OpenMP threads on two loaded cores spin at every barrier), while single-thread CPU time measures the work.
  Wall seconds are reported beside it (`seconds`); `--threads N` changes the thread count.
- Repeats are interleaved (repeat 1 of every case, then repeat 2, ...) so that a busy machine slows all the
  cases of a comparison alike; the table shows medians, and the spread (min..max of the timed metric).
- Each benchmark module exposes `cases(size) -> list[Case]` and `run(params) -> dict` (run inside the child).
  A case's `group` names the comparison; the first case of a group is the baseline of its ratios.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = (
    "prefill",
    "train_step",
    "retrieval",
    "overhead",
    "growth",
    "prefill_longllama",
    "fsdp_memory",
    "train_step_jax",
)
MODULES = {
    "prefill_longllama": "longllama_ref",
    "fsdp_memory": "sharded_memory",
}  # benchmark name -> module under benchmarks/ (default: same name)
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Case:
    """One configuration of one benchmark. `metric` is the timed value ratios are taken of (lower = better)."""

    benchmark: str
    group: str
    name: str
    params: dict
    metric: str = "cpu_seconds"
    max_repeats: int | None = None  # cap for very slow cases (None = the runner's --repeats)
    timeout_s: float = 1800.0
    python: str | None = None  # interpreter of the child (None = this one; e.g. a reference implementation's venv)


def module_name(benchmark: str) -> str:
    """The `benchmarks.*` module that implements `benchmark`."""
    return f"benchmarks.{MODULES.get(benchmark, benchmark)}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident set size of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process (all threads), result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0, result


def timed_on(device: str, fn, *args, **kwargs) -> tuple[float, float, object]:
    """`timed` for work on `device`: on CUDA the queue is drained before and after, so wall time is the work's."""
    if device == "cpu":
        return timed(fn, *args, **kwargs)
    import torch

    torch.cuda.synchronize()

    def run_and_sync():
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result

    return timed(run_and_sync)


def gpu_peak_mib(device: str) -> dict:
    """{"peak_gpu_mib": ...}: the CUDA allocator's peak since the last reset (empty on CPU)."""
    if device == "cpu":
        return {}
    import torch

    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def thread_env(threads: int | None) -> dict:
    """Environment pinning the math libraries (OpenMP, MKL, torch, FAISS) to `threads` threads (None = defaults)."""
    if threads is None:
        return {}
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS")}


def run_in_subprocess(case: Case, threads: int | None = 1) -> dict:
    """Run `case` in a fresh Python with `threads` math threads; returns its metrics dict, or {"error": ...}."""
    cmd = [case.python or sys.executable, "-m", "benchmarks.child", case.benchmark, json.dumps(case.params)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **thread_env(threads),
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=case.timeout_s, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {case.timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def collect_cases(names: list[str], size: str, device: str = "cpu", log=print) -> list[Case]:
    """The cases of benchmarks `names`. On `device` "cuda" only benchmarks that declare `DEVICES` with "cuda" run
    (the others are CPU comparisons, e.g. against FAISS on CPU), each case gets params["device"], and the timed
    metric becomes wall seconds (CPU time of the host says nothing about GPU work)."""
    cases = []
    for name in names:
        module = importlib.import_module(module_name(name))
        if device == "cpu":
            cases.extend(module.cases(size))
            continue
        if device not in getattr(module, "DEVICES", ("cpu",)):
            log(f"{name}: skipped on {device} (a CPU benchmark)")
            continue
        for case in module.cases(size, device):
            cases.append(dataclasses.replace(case, params={**case.params, "device": device}, metric="seconds"))
    return cases


def run_cases(cases: list[Case], repeats: int, log=print, threads: int | None = 1) -> list[dict]:
    """Run every case `repeats` times, interleaved; returns one record per case with all samples."""
    samples: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    for rep in range(repeats):
        for i, case in enumerate(cases):
            if case.max_repeats is not None and rep >= case.max_repeats:
                continue
            result = run_in_subprocess(case, threads)
            samples[i].append(result)
            shown = result.get("error") or f"{case.metric}={result.get(case.metric, float('nan')):.3f}"
            log(f"[{rep + 1}/{repeats}] {case.benchmark}/{case.group}/{case.name}: {shown}")
    return [summarise(case, samples[i]) for i, case in enumerate(cases)]


def summarise(case: Case, results: list[dict]) -> dict:
    """Medians of every numeric metric over the successful samples, plus the spread of the timed metric."""
    ok = [r for r in results if "error" not in r]
    record = {
        "benchmark": case.benchmark,
        "group": case.group,
        "name": case.name,
        "params": case.params,
        "metric": case.metric,
        "n_ok": len(ok),
        "errors": [r["error"] for r in results if "error" in r],
        "samples": ok,
        "median": {},
    }
    keys = sorted({k for r in ok for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
        values = [r[key] for r in ok if key in r]
        record["median"][key] = statistics.median(values)
    timed_values = [r[case.metric] for r in ok if case.metric in r]
    if timed_values:
        record["min"], record["max"] = min(timed_values), max(timed_values)
    return record


def add_ratios(records: list[dict]) -> None:
    """ratio = median metric / median metric of the first case of the same (benchmark, group)."""
    baselines: dict[tuple, float] = {}
    for rec in records:
        value = rec["median"].get(rec["metric"])
        key = (rec["benchmark"], rec["group"])
        if key not in baselines and value is not None:
            baselines[key] = value
        base = baselines.get(key)
        rec["ratio"] = None if value is None or not base else value / base


def format_table(records: list[dict]) -> str:
    """Plain-text table: one row per case, medians, spread and ratio to its group's first case."""
    metric = "wall s" if records and all(rec["metric"] == "seconds" for rec in records) else "CPU s"
    header = (
        f"{'benchmark':<11} {'group':<22} {'case':<22} {metric:>10} {'min..max':>17} {'ratio':>6} "
        f"{'peak RSS MiB':>12} {'n':>2}  notes"
    )
    rows = [header, "-" * len(header)]
    for rec in records:
        med = rec["median"]
        value = med.get(rec["metric"])
        unit = "s" if rec["metric"].endswith("seconds") else ""
        shown = "-" if value is None else f"{value:.3f}{unit}"
        spread = f"{rec['min']:.3f}..{rec['max']:.3f}" if "min" in rec else "-"
        ratio = "-" if rec.get("ratio") is None else f"{rec['ratio']:.2f}x"
        rss = f"{med['peak_rss_mib']:.0f}" if "peak_rss_mib" in med else "-"
        notes = "; ".join(rec["errors"][:1]) or _notes(med, rec["metric"])
        rows.append(
            f"{rec['benchmark']:<11} {rec['group']:<22} {rec['name']:<22} {shown:>10} {spread:>17} "
            f"{ratio:>6} {rss:>12} {rec['n_ok']:>2}  {notes}"
        )
    return "\n".join(rows)


def _notes(median: dict, metric: str) -> str:
    """Extra metrics worth a glance (everything numeric except the standard columns)."""
    skip = {"cpu_seconds", "peak_rss_mib", metric}
    return " ".join(f"{k}={v:.4g}" for k, v in median.items() if k not in skip)[:120]


def machine_info() -> dict:
    """What the numbers were measured on."""
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "processor": platform.processor(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
