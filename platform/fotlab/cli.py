"""The `fotlab` command.

    fotlab validate experiments/*.yaml             # check specs (one line per problem)
    fotlab run experiments/quickstart.yaml --set train.steps=20 --json
    fotlab runs list                               # browse MLflow runs in the terminal; `fotlab ui` for the web UI
    fotlab results --out docs/results.md           # tables + plots of every run's evaluations

Design choices:
- argparse only; every heavy import (mlflow, ray, torch) happens inside the handler that needs it, so
  `fotlab --help` and `fotlab validate` start fast.
- User mistakes (`FotlabError`: bad spec, unknown run, missing file) end with ONE line on stderr and exit 1;
  anything else is a bug and keeps its traceback. Usage mistakes (a missing argument, an unknown flag or command)
  do the same (`FotlabArgumentParser`), where argparse's own would print its usage block and exit 2.
- `run`, `eval`, `sweep`, `submit` live in `fotlab.orchestrate` (`<verb>_command`, see `_cmd_orchestrate`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from fotlab.errors import FotlabError

EXIT_USER_ERROR = 1


class FotlabArgumentParser(argparse.ArgumentParser):
    """argparse with fotlab's user-error contract: a usage mistake is one line on stderr naming it and how to get
    help, exit status 1. `--help` and `--version` still print and exit 0. Subcommand parsers are of this class too
    (`add_subparsers` makes them with the parent's class)."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> NoReturn:
    """`<prog>: error: <message> (see `<prog> --help`)` on stderr, exit 1."""
    print(f"{prog}: error: {' '.join(message.split())} (see `{prog} --help`)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _add_spec_args(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("spec", metavar="SPEC", help="experiment spec (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.steps=10 (repeatable; value parsed as YAML)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="end with one JSON object on stdout (for scripts/CI)")


def build_parser() -> argparse.ArgumentParser:
    """The `fotlab` argument parser (subcommand -> handler in `args.handler`)."""
    parser = FotlabArgumentParser(prog="fotlab", description="Focused Transformer experiment platform.")
    parser.add_argument("--version", action="version", version=f"fotlab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train (+ the spec's evaluations) as one MLflow run")
    _add_spec_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (MLflow run id or name)")
    p.add_argument("--address", help="Ray cluster address to attach to (default: a local cluster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress display")
    p.set_defaults(handler=_cmd_orchestrate)

    p = sub.add_parser("eval", help="run the spec's evaluations on a trained model")
    _add_spec_args(p)
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR|runs:/RUN_ID|models:/NAME/VERSION",
        help="model directory, MLflow run, or registered model (VERSION may be 'latest')",
    )
    p.set_defaults(handler=_cmd_orchestrate)

    p = sub.add_parser("sweep", help="hyper-parameter sweep on Ray Tune")
    p.add_argument("spec", metavar="SWEEP_SPEC", help="sweep spec (YAML)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep")
    p.add_argument("--address", help="Ray cluster address to attach to (default: a local cluster)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    p.set_defaults(handler=_cmd_orchestrate)

    p = sub.add_parser("submit", help="run the spec on a remote Ray cluster (Ray Jobs)")
    _add_spec_args(p)
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.set_defaults(handler=_cmd_orchestrate)

    p = sub.add_parser("render-job", help="print a KubeRay RayJob (+ spec ConfigMap) for the spec: kubectl apply -f -")
    _add_spec_args(p, json_flag=False)
    p.add_argument("--overlay", metavar="gpu|tpu", help="worker kind (default: CPU workers)")
    p.add_argument("--image", help="the fotlab image the pods run (default: fotlab:<version>-<overlay>)")
    p.set_defaults(handler=_cmd_render_job)

    p = sub.add_parser("validate", help="check specs; one line per problem")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec files")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every spec before validating",
    )
    p.add_argument(
        "--no-check-paths",
        dest="check_paths",
        action="store_false",
        help="do not check that local data/tokenizer paths exist (specs meant for another machine)",
    )
    p.add_argument("--print", dest="print_spec", action="store_true", help="print the full resolved spec (YAML)")
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of experiment specs")
    p.set_defaults(handler=_cmd_schema)

    _add_runs_parser(sub)

    p = sub.add_parser("results", help="write docs/results.md (tables + plots) from the runs' eval metrics")
    _add_report_args(p)
    p.set_defaults(handler=_cmd_results)

    p = sub.add_parser("ui", help="serve the MLflow UI on the configured tracking store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--uri", help="tracking store (default: $MLFLOW_TRACKING_URI or <project>/mlflow.db)")
    p.set_defaults(handler=_cmd_ui)
    return parser


def _add_runs_parser(sub) -> None:
    uri_help = "tracking store (default: $MLFLOW_TRACKING_URI or <project>/mlflow.db)"
    runs = sub.add_parser("runs", help="browse MLflow runs in the terminal")
    runs.add_argument("--uri", help=uri_help)
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="ACTION")
    p = runs_sub.add_parser("list", help="newest runs first")
    p.add_argument("--uri", default=argparse.SUPPRESS, help=uri_help)
    p.add_argument("--experiment", help="only this experiment")
    p.add_argument("--sweep", help="only the runs of this sweep")
    p.add_argument("--limit", type=int, default=30, help="at most this many runs (default 30)")
    p = runs_sub.add_parser("show", help="one run: status, params, final metrics, artifacts")
    p.add_argument("--uri", default=argparse.SUPPRESS, help=uri_help)
    p.add_argument("run", help="run id or run name")
    p = runs_sub.add_parser("compare", help="runs side by side (params that differ, final metrics)")
    p.add_argument("--uri", default=argparse.SUPPRESS, help=uri_help)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or names")
    p = runs_sub.add_parser(
        "deliver", help="send what a run saved while its tracking server was down (undelivered_metrics.jsonl)"
    )
    p.add_argument("--uri", default=argparse.SUPPRESS, help="tracking store (default: the one named in FILE)")
    p.add_argument("file", metavar="FILE", help="the undelivered-metrics file `fotlab run` named")
    runs.set_defaults(handler=_cmd_runs, runs_command="list", experiment=None, sweep=None, limit=30)


def _add_report_args(p: argparse.ArgumentParser) -> None:
    from fotlab.eval.report import add_arguments  # light: argparse and pathlib only

    add_arguments(p)


def _cmd_results(args: argparse.Namespace) -> int:
    from fotlab.eval.report import run

    return run(args)


def _version() -> str:
    import fotlab

    return fotlab.__version__


def _cmd_validate(args: argparse.Namespace) -> int:
    from fotlab.spec import SpecError, is_sweep_file, load_spec, load_sweep, spec_to_yaml

    n_bad = 0
    for path in args.specs:
        try:
            if is_sweep_file(path):
                sweep = load_sweep(path, check_paths=args.check_paths)
                print(f"{path}: ok (sweep {sweep.name}: {len(sweep.search_space)} searched fields)")
                continue
            spec = load_spec(path, args.overrides, check_paths=args.check_paths)
        except SpecError as exc:
            print(exc, file=sys.stderr)
            n_bad += 1
            continue
        print(spec_to_yaml(spec) if args.print_spec else f"{path}: ok ({spec.name})")
    return EXIT_USER_ERROR if n_bad else 0


def _cmd_render_job(args: argparse.Namespace) -> int:
    from fotlab.orchestrate.kuberay import render_job_command

    return render_job_command(args)


def _cmd_schema(args: argparse.Namespace) -> int:
    from fotlab.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from fotlab import cli_runs

    return cli_runs.main(args)


def _cmd_ui(args: argparse.Namespace) -> int:
    from fotlab import cli_runs

    return cli_runs.serve_ui(args)


def _cmd_orchestrate(args: argparse.Namespace) -> int:
    """`fotlab run | eval | sweep | submit`: the handler of the same name in fotlab.orchestrate. Each takes the
    parsed arguments (spec, overrides, json, and the verb's own options) and returns a JSON-able dict (printed
    when --json) or an int exit code."""
    import fotlab.orchestrate as orchestrate

    result = getattr(orchestrate, f"{args.command}_command")(args)
    if isinstance(result, int):
        return result
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fotlab` console script; returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # what parse_args reports, but naming the command whose --help lists the right flags
        usage_error(f"{parser.prog} {args.command}", f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except FotlabError as exc:
        message = " ".join(str(exc).splitlines())
        prefix = f"fotlab {args.command}: "
        print(message if message.startswith(prefix) else prefix + message, file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"fotlab {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `fotlab` console script: `main()`, then a fast exit.

    Once the command has returned (its output printed), Ray is shut down (a local cluster stopped), the other
    threads are joined and the exit handlers have run (MLflow's, logging's flush); what remains of a normal exit
    is tearing the interpreter down module by module: about 1.5 s with torch, Ray and MLflow loaded, for nothing.
    The process ends there instead.
    """
    code = main()
    import atexit
    import os
    import threading

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # now, not from Ray's exit hook, which first waits 0.5 s for late worker log lines
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is None:  # not CPython as we know it: a normal exit
        sys.exit(code)
    # What interpreter exit does, in its order: thread-exit hooks (they stop e.g. thread-pool workers), then join
    # the non-daemon threads, then the atexit handlers.
    shutdown_threads()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
