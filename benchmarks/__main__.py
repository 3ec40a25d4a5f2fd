"""Run the benchmark suite.

    python -m benchmarks [BENCHMARK ...] [--size full|tiny] [--device cpu|cuda] [--repeats N] [--json PATH]

Examples: `python -m benchmarks --size tiny` (smoke, ~1-2 min), `python -m benchmarks retrieval train_step`,
`python -m benchmarks --repeats 5 --json bench.json`. Benchmarks: prefill, train_step, retrieval, overhead, growth,
prefill_longllama (against the public LongLLaMA code: needs `--longllama-code DIR --longllama-python PY`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.runner import BENCHMARKS, add_ratios, collect_cases, format_table, machine_info, run_cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument(
        "benchmarks", nargs="*", choices=[[], *BENCHMARKS], default=[], help="benchmarks to run (default: all)"
    )
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full sizes or a tiny smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats per case (median shown)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="math threads per case (default 1: CPU time is then robust on a busy machine; 0 = library defaults)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the GPU variants of prefill, growth and train_step (bf16; wall seconds, peak GPU "
        "memory); the CPU-only comparisons are skipped",
    )
    parser.add_argument("--json", dest="json_path", help="also write all samples, medians and ratios here")
    parser.add_argument("--quiet", action="store_true", help="no per-sample progress lines")
    parser.add_argument(
        "--longllama-code",
        metavar="DIR",
        help="prefill_longllama: a dir with the public LongLLaMA modeling files (modeling_longllama.py, "
        "configuration_longllama.py, longllama_utils.py)",
    )
    parser.add_argument(
        "--longllama-python",
        metavar="PY",
        help="prefill_longllama: an interpreter where that code runs (transformers 4.33)",
    )
    parser.add_argument(
        "--longllama-ckpt",
        metavar="DIR",
        help="prefill_longllama: where the shared LongLLaMA-format checkpoint is written/reused "
        "(default: $TMPDIR/fotlab-bench-longllama)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    names = list(args.benchmarks) or list(BENCHMARKS)
    if "prefill_longllama" in names:
        from benchmarks import longllama_ref

        longllama_ref.configure(args.longllama_code, args.longllama_python, args.longllama_ckpt)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    cases = collect_cases(names, args.size, args.device, log)
    started = time.time()
    info = {**machine_info(), "threads_per_case": args.threads or "default"}
    records = run_cases(cases, args.repeats, log, args.threads or None)
    add_ratios(records)
    print(format_table(records))
    print(
        f"\n{len(cases)} cases x {args.repeats} repeats (fresh process each; medians); "
        f"{time.time() - started:.0f} s; machine: {info}"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "size": args.size,
                    "device": args.device,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "records": records,
                    "started_unix": started,
                    "finished_unix": time.time(),
                },
                f,
                indent=1,
            )
    return records


if __name__ == "__main__":
    main()
