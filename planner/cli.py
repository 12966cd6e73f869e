"""The `ditplan` command line. Each subcommand lives in planner/commands/<name>.py and provides
`add_arguments(parser)` and `run(args) -> int` (its one-line help is in COMMANDS); modules are imported only when
their subcommand runs, so `ditplan simulate` never pays for torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from costmodel.errors import DitplanError
from costmodel.interrupts import Stopped

# name -> one-line help; the module planner.commands.<name> implements it.
COMMANDS: dict[str, str] = {
    "models": "list the built-in models",
    "clusters": "list the built-in clusters",
    "simulate": "predict latency, memory and timeline of one configuration",
    "search": "rank every valid configuration and write the best as a plan",
    "validate": "compare predictions with published (and measured) latencies",
    "calibrate": "fit the cluster's physical constants to measured latencies",
    "profile": "measure this machine and write a cluster profile",
    "run": "run a plan for real under torchrun (executor)",
}


def _command_module(name: str):
    return importlib.import_module(f"planner.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditplan",
        description="Plan, simulate and run parallel Diffusion Transformer inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        _command_module(name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen == "run":
        # `ditplan run` hands its arguments to the executor's launcher untouched.
        return _command_module("run").run_passthrough(argv[argv.index("run") + 1:])
    parser = build_parser(only=chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(_command_module(args.command).run(args) or 0)
    except DitplanError as error:
        print(f"ditplan {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(f"ditplan {args.command}: stopped by {stop.name}", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:
        # The reader (e.g. `| head`) closed the pipe: not an error of ours. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def search_main(argv: list[str] | None = None) -> int:
    """`plan-search` is `ditplan search`."""
    return main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
