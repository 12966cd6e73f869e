"""`ditplan run`: run a plan for real. The executor's launcher (executor.launch, which wraps
torchrun) runs in this process, imported only when this command runs, so no other command pays for
torch; signals sent to this process reach the launcher, which stops every worker.

The flags are defined here, once; the executor's launcher builds its parser from `add_arguments`.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="M|PATH",
                        help="model: a tiny id (tiny-pixart-alpha, tiny-flux-dev, ...; built offline with seeded random "
                             "weights), a Hugging Face id or a local pipeline folder (loaded with from_pretrained); "
                             "default: the plan file's model")
    parser.add_argument("--plan", required=True, metavar="plan.json|auto|CONFIG",
                        help="a plan file from `ditplan search --out` (its model, sizes and steps run; a flag may "
                             "repeat them, not change them), 'auto' (search --cluster for --nproc GPUs), "
                             "or a configuration such as 'cfg=2,ulysses=2'")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="processes (GPUs) to launch; must equal the plan's GPU count "
                             "(default: the plan's GPU count; 1 for --plan auto)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for the PNG images (video: PNG frames) and run.json; "
                             "written only when the run succeeds")
    parser.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT",
                        help="prompt(s); several prompts make a batch (split across data-parallel replicas)")
    parser.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for classifier-free guidance")
    parser.add_argument("--height", type=int, metavar="H", help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, metavar="W", help="image width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, metavar="F", help="video frames (video models; default: the model's)")
    parser.add_argument("--steps", type=int, metavar="S", help="denoising steps (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, metavar="G", help="guidance scale (default: the pipeline's)")
    parser.add_argument("--guidance-scale-2", type=float, metavar="G",
                        help="the low-noise expert's guidance scale (two-expert models: Wan 2.2 A14B; default: --guidance-scale)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed; prompt i uses seed+i, so the images do not depend on the plan (default 0)")
    parser.add_argument("--cluster", metavar="C",
                        help="cluster id or YAML path that --plan auto plans for (see `ditplan clusters`)")
    parser.add_argument("--backend", choices=("gloo", "nccl"),
                        help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    parser.add_argument("--print-layout", action="store_true", help="print the rank layout (groups per axis) before running")
    parser.add_argument("--trace", metavar="OUT.json",
                        help="write a Chrome-trace/Perfetto timeline of what each rank did (compute, communication, "
                             "waiting), in the layout of `ditplan simulate --trace`; run.json gets the per-rank totals")
    add_multinode_arguments(parser)


def add_multinode_arguments(parser: argparse.ArgumentParser) -> None:
    """torchrun's multi-node settings: run `ditplan run` once per node with the same flags and its own
    --node-rank. Global rank = node rank x (nproc / nnodes) + local rank, which the plan's rank map
    (innermost axes on consecutive ranks) turns into the planner's placement."""
    group = parser.add_argument_group("multi-node (torchrun's settings; run the same command on every node)")
    group.add_argument("--nnodes", type=int, default=1, metavar="K",
                       help="nodes in the job (default 1); --nproc counts the processes of all nodes together")
    group.add_argument("--node-rank", type=int, default=0, metavar="I", help="this node's rank, 0..K-1 (default 0)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                       help="address of node 0 and a free port on it, reachable from every node (needed with --nnodes > 1)")
    group.add_argument("--rdzv-id", default="ditplan", metavar="ID",
                       help="job id, the same on every node (default: ditplan)")


def check_nodes(nnodes: int, node_rank: int, endpoint: str | None) -> None:
    """Refuse node settings that torchrun (or the profiler's link measurement) would reject late."""
    from costmodel.errors import DitplanError

    if nnodes < 1:
        raise DitplanError(f"--nnodes {nnodes}: at least one node is needed.")
    if not 0 <= node_rank < nnodes:
        raise DitplanError(f"--node-rank {node_rank}: must be between 0 and --nnodes - 1 = {nnodes - 1}.")
    if nnodes == 1:
        return
    host, _, port = (endpoint or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DitplanError(f"--rdzv-endpoint {endpoint!r}: --nnodes {nnodes} needs HOST:PORT, node 0's address as "
                           "every node reaches it and a free port there (e.g. 10.0.0.1:29500).")


def run_passthrough(argv: list[str]) -> int:
    """Run the executor's launcher on ARGV and return its exit status."""
    from executor.launch import main

    return main(argv)
