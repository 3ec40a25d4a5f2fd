"""Child process entry: `python -m benchmarks.child BENCHMARK PARAMS_JSON` runs one case and prints one JSON line
with its metrics (always including `peak_rss_mib`, the process's peak resident set size)."""

from __future__ import annotations

import importlib
import json
import os
import sys

from benchmarks.runner import module_name, peak_rss_mib


def main(argv: list[str]) -> None:
    benchmark, params = argv[0], json.loads(argv[1])
    if os.environ.get("BENCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    module = importlib.import_module(module_name(benchmark))
    metrics = module.run(params)
    metrics.setdefault("peak_rss_mib", peak_rss_mib())
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
