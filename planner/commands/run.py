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
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed; prompt i uses seed+i, so the images do not depend on the plan (default 0)")
    parser.add_argument("--cluster", metavar="C",
                        help="cluster id or YAML path that --plan auto plans for (see `ditplan clusters`)")
    parser.add_argument("--backend", choices=("gloo", "nccl"),
                        help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    parser.add_argument("--print-layout", action="store_true", help="print the rank layout (groups per axis) before running")


def run_passthrough(argv: list[str]) -> int:
    """Run the executor's launcher on ARGV and return its exit status."""
    from executor.launch import main

    return main(argv)
