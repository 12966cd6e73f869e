"""`ditplan profile`: measure this machine (compute at DiT shapes, collectives and point-to-point
over torch.distributed) and write a cluster profile that `--cluster PATH` accepts everywhere.

The measuring code (costmodel.profiler, which imports torch) is imported only when this runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = "this-machine.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                        help=f"profile file to write (default: {DEFAULT_OUT}); replaced only once the new one is complete")
    parser.add_argument("--nproc", metavar="N[,N...]",
                        help="process counts to measure communication for, e.g. 2,4 "
                             "(default: 2 and 4 where this machine has that many cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    nodes = parser.add_argument_group(
        "several nodes (run the same command on every node; node 0 writes a profile of that many such nodes "
        "with the link between them as the network tier)")
    nodes.add_argument("--nnodes", type=int, default=1, metavar="K", help="nodes to profile together (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, metavar="I", help="this node's rank, 0..K-1 (default 0)")
    nodes.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                       help="node 0's address as every node reaches it and a free port there (needed with --nnodes > 1)")
    nodes.add_argument("--gpus-per-node", type=int, metavar="N",
                       help="processes each node will run (default: the largest --nproc count): the node shape of the profile")


def run(args: argparse.Namespace) -> int:
    from costmodel.topology import load_cluster
    from costmodel.profiler.run import parse_process_counts, profile_machine, profile_nodes
    from planner.commands.run import check_nodes

    from costmodel.errors import DitplanError
    from costmodel.files import check_output

    check_nodes(args.nnodes, args.node_rank, args.rdzv_endpoint)
    if args.gpus_per_node is not None and (args.nnodes == 1 or args.gpus_per_node < 1):
        raise DitplanError(f"--gpus-per-node {args.gpus_per_node}: give a count >= 1, together with --nnodes > 1.")

    counts = parse_process_counts(args.nproc) if args.nproc else None
    # Checked before the measurement (minutes), and again when the file is written.
    out = check_output(args.out, "--out")

    # The cost model's own strict loader checks the file before it replaces --out.
    def check(temp: Path) -> object:
        return load_cluster(str(temp))

    if args.nnodes > 1:
        report = profile_nodes(out, args.nnodes, args.node_rank, args.rdzv_endpoint, counts,
                               progress=not args.no_progress, check=check, gpus_per_node=args.gpus_per_node)
    else:
        report = profile_machine(out, counts, progress=not args.no_progress, check=check)
    if args.format == "json":
        from planner.commands.common import print_json

        print_json({"path": str(report.path) if report.path else None, "summary": report.lines})
    else:
        for line in report.lines:
            print(line)
        if report.path is not None:
            print(f"profile written to {report.path}; use it with --cluster {report.path}")
    return 0
