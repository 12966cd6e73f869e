"""`ditplan clusters`: the built-in clusters, their GPUs and link tiers."""
from __future__ import annotations

import argparse

from planner.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", help="show one cluster (id or YAML path) in detail, with every link's source")
    parser.add_argument("--nodes", type=int, help="with --cluster: replicate the node this many times")
    common.add_format_argument(parser)


def _describe(cluster) -> dict[str, object]:
    graph = cluster.graph()
    return {
        "id": cluster.id, "description": cluster.description, "hardware": cluster.hardware.id,
        "gpu": cluster.hardware.name, "gpus": cluster.gpus, "nodes": cluster.nodes,
        "gpus_per_node": cluster.gpus_per_node, "sockets": cluster.sockets, "p2p": cluster.p2p,
        "memory_gib": cluster.hardware.memory_gib, "peak_tflops": cluster.hardware.peak_tflops,
        "graph": {"vertices": graph.number_of_nodes(), "links": graph.number_of_edges()},
        "tiers": {
            name: {"bandwidth_gbs": link.bandwidth_gbs, "efficiency": link.efficiency,
                   "alltoall_efficiency": link.alltoall_efficiency, "latency_us": link.latency_us, "source": link.source}
            for name, link in cluster.tiers().items()
        },
        "measured": cluster.measured is not None,
    }


def run(args: argparse.Namespace) -> int:
    from costmodel import list_clusters, load_cluster

    if args.cluster:
        described = [_describe(load_cluster(args.cluster, nodes=args.nodes))]
    else:
        described = [_describe(load_cluster(name)) for name in list_clusters()]
    if args.format == "json":
        common.print_json(described if not args.cluster else described[0])
        return 0
    if args.cluster:
        d = described[0]
        print(f"{d['id']}: {d['description']}")
        print(f"{d['gpus']} x {d['gpu']} ({d['memory_gib']:.1f} GiB, {d['peak_tflops']:g} TFLOP/s dense bf16), "
              f"{d['nodes']} node(s), {d['sockets']} socket(s) per node, GPU peer-to-peer "
              f"{'on' if d['p2p'] else 'off (host-staged)'}; graph of {d['graph']['vertices']} vertices and "
              f"{d['graph']['links']} links")
        rows = [(name, t["bandwidth_gbs"], t["efficiency"], t["alltoall_efficiency"], t["latency_us"])
                for name, t in d["tiers"].items()]
        print(common.format_table(rows, ("tier", "GB/s per dir", "p2p fraction", "all-to-all fraction", "latency us")))
        for name, tier in d["tiers"].items():
            print(f"  {name}: {tier['source']}")
        return 0

    def tier_text(tiers: dict) -> str:
        return ", ".join(f"{name} {t['bandwidth_gbs'] * t['efficiency']:.0f}" for name, t in tiers.items())

    rows = [(d["id"], d["gpus"], d["nodes"], d["gpu"], f"{d['memory_gib']:.0f}", d["sockets"],
             tier_text(d["tiers"])) for d in described]
    print(common.format_table(rows, ("cluster", "GPUs", "nodes", "GPU", "GiB", "sockets", "achieved GB/s per tier"),
                              align="lrrlrrl"))
    return 0
