"""`ditplan profile`: measure this machine (compute at DiT shapes, collectives and point-to-point
over torch.distributed) and write a cluster profile that `--cluster PATH` accepts everywhere.

The measuring code (costmodel.profiler, which imports torch) is imported only when this runs.
"""
from __future__ import annotations

import argparse

DEFAULT_OUT = "this-machine.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                        help=f"profile file to write (default: {DEFAULT_OUT}); replaced only once the new one is complete")
    parser.add_argument("--nproc", metavar="N[,N...]",
                        help="process counts to measure communication for, e.g. 2,4 "
                             "(default: 2 and 4 where this machine has that many cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")


def run(args: argparse.Namespace) -> int:
    from costmodel.topology import load_cluster
    from costmodel.profiler.run import parse_process_counts, profile_machine

    from costmodel.files import check_output

    counts = parse_process_counts(args.nproc) if args.nproc else None
    # Checked before the measurement (minutes), and again when the file is written.
    out = check_output(args.out, "--out")
    # The cost model's own strict loader checks the file before it replaces --out.
    report = profile_machine(out, counts, progress=not args.no_progress, check=lambda temp: load_cluster(str(temp)))
    if args.format == "json":
        from planner.commands.common import print_json

        print_json({"path": str(report.path), "summary": report.lines})
    else:
        for line in report.lines:
            print(line)
        print(f"profile written to {report.path}; use it with --cluster {report.path}")
    return 0
