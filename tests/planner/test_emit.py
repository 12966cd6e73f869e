"""`ditplan search --emit`: the best plan as xDiT's launch flags and diffusers' parallel configuration."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys

import pytest

from costmodel.config import AXES, ParallelConfig, Placement
from costmodel.errors import DitplanError
from planner.emit import DIFFUSERS_CP_FAMILIES, device_order, emit
from planner.plan import Plan


def xfuser_parser() -> argparse.ArgumentParser:
    """xDiT's documented launch arguments (xfuser `xFuserArgs.add_cli_args`), names, types and actions."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=str)
    parser.add_argument("--download-dir", type=str)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--use_parallel_vae", action="store_true")
    parser.add_argument("--use_torch_compile", action="store_true")
    parser.add_argument("--use_onediff", action="store_true")
    parser.add_argument("--use_teacache", action="store_true")
    parser.add_argument("--use_fbcache", action="store_true")
    parser.add_argument("--use_ray", action="store_true")
    parser.add_argument("--ray_world_size", type=int, default=1)
    parser.add_argument("--dit_parallel_size", type=int, default=0)
    parser.add_argument("--use_cfg_parallel", action="store_true")
    parser.add_argument("--data_parallel_degree", type=int, default=1)
    parser.add_argument("--ulysses_degree", type=int, default=None)
    parser.add_argument("--ring_degree", type=int, default=None)
    parser.add_argument("--pipefusion_parallel_degree", type=int, default=1)
    parser.add_argument("--num_pipeline_patch", type=int, default=None)
    parser.add_argument("--attn_layer_num_for_pp", default=None, nargs="*", type=int)
    parser.add_argument("--tensor_parallel_degree", type=int, default=1)
    parser.add_argument("--vae_parallel_size", type=int, default=0)
    parser.add_argument("--split_scheme", type=str, default="row")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--num_frames", type=int, default=49)
    parser.add_argument("--img_file_path", type=str, default=None)
    parser.add_argument("--prompt", type=str, nargs="*", default="")
    parser.add_argument("--no_use_resolution_binning", action="store_true")
    parser.add_argument("--negative_prompt", type=str, nargs="*", default="")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--max_sequence_length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_type", type=str, default="pil")
    parser.add_argument("--guidance_scale", type=float, default=3.5)
    parser.add_argument("--enable_sequential_cpu_offload", action="store_true")
    parser.add_argument("--enable_model_cpu_offload", action="store_true")
    parser.add_argument("--enable_tiling", action="store_true")
    parser.add_argument("--enable_slicing", action="store_true")
    parser.add_argument("--use_fp8_t5_encoder", action="store_true")
    return parser


def xdit_config(args: argparse.Namespace) -> ParallelConfig:
    """The configuration an xDiT launch runs (its degrees default to 1, patches to the PipeFusion degree)."""
    return ParallelConfig(cfg=2 if args.use_cfg_parallel else 1, ulysses=args.ulysses_degree or 1,
                          ring=args.ring_degree or 1, pipefusion=args.pipefusion_parallel_degree,
                          patches=args.num_pipeline_patch, warmup=args.warmup_steps, dp=args.data_parallel_degree)


def launched(command: str) -> tuple[list[int] | None, int, argparse.Namespace]:
    """(CUDA_VISIBLE_DEVICES order, torchrun process count, the script's parsed arguments) of a launch line."""
    words = shlex.split(command)
    visible = None
    if words[0].startswith("CUDA_VISIBLE_DEVICES="):
        visible = [int(gpu) for gpu in words.pop(0).partition("=")[2].split(",")]
    assert words[0] == "torchrun" and words[1].startswith("--nproc_per_node=")
    return visible, int(words[1].partition("=")[2]), xfuser_parser().parse_args(words[3:])


def groups_on_gpus(placement: Placement, gpu_of_rank: list[int]) -> set[tuple[str, tuple[int, ...]]]:
    return {(axis, tuple(gpu_of_rank[r] for r in members)) for axis in AXES for members in placement.groups(axis)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, cluster, gpus", [("flux-dev", "h100-sxm-nvlink-8", 4), ("pixart-alpha", "l40-pcie-8", 8)])
def test_search_emits_xdit_flags_that_its_parser_accepts_and_reproduce_the_plan(model, cluster, gpus):
    done = subprocess.run([sys.executable, "-m", "planner", "search", "--model", model, "--cluster", cluster,
                           "--gpus", str(gpus), "--emit", "xdit", "--format", "json"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    best, emitted = payload["plans"][0], payload["emit"]
    assert emitted["engine"] == "xdit" and emitted["cannot_express"] == []
    visible, processes, args = launched(emitted["command"])
    plan_config = ParallelConfig.parse(best["config"])
    assert processes == gpus
    assert xdit_config(args) == dataclasses.replace(plan_config, vae=1)
    assert args.use_parallel_vae == (plan_config.vae > 1)
    # xDiT places ranks in the default order; the visible-device order must put its groups on the plan's GPUs.
    plan_placement = Placement(plan_config, tuple(best["placement"]))
    xdit_gpus = visible or list(range(gpus))
    assert groups_on_gpus(Placement(xdit_config(args)), xdit_gpus) == groups_on_gpus(plan_placement, list(range(gpus)))


def _plan(config: str, model: str = "pixart-alpha", placement: tuple[str, ...] | None = None) -> Plan:
    parsed = ParallelConfig.parse(config)
    return Plan(model=model, height=1024, width=1024, frames=1, steps=20, cluster="l40-pcie-8", gpus=parsed.world_size,
                config=parsed, placement=Placement(parsed, placement) if placement else Placement(parsed))


def test_xdit_says_what_it_cannot_express():
    assert emit(_plan("cfg=2,ulysses=2,vae=4"), "xdit").cannot_express == []
    notes = emit(_plan("cfg=2,ulysses=2,vae=2"), "xdit").cannot_express
    assert len(notes) == 1 and "vae=2" in notes[0] and "all 4 GPUs" in notes[0]
    multi_node = Plan(model="pixart-alpha", height=1024, width=1024, frames=1, steps=20, cluster="l40-pcie-8x2-eth",
                      gpus=16, config=ParallelConfig(pipefusion=8, dp=2),
                      placement=Placement(ParallelConfig(pipefusion=8, dp=2), ("dp", "ulysses", "ring", "pipefusion", "cfg")))
    settings = emit(multi_node, "xdit")
    assert not settings.command.startswith("CUDA_VISIBLE_DEVICES") and "placement" in settings.cannot_express[0]


def test_device_order_is_none_for_the_default_placement():
    assert device_order(_plan("cfg=2,pipefusion=4")) is None
    assert device_order(_plan("cfg=2,pipefusion=4", placement=("cfg", "pipefusion", "ulysses", "ring", "dp"))) == [0, 2, 4, 6, 1, 3, 5, 7]


def test_diffusers_gets_context_parallel_degrees_and_the_rest_in_words():
    from diffusers import ContextParallelConfig

    settings = emit(_plan("ulysses=2,ring=2", model="flux-dev"), "diffusers")
    assert settings.cannot_express == []
    ContextParallelConfig(**settings.settings)  # diffusers accepts the degrees
    assert "ContextParallelConfig(ulysses_degree=2, ring_degree=2)" in settings.command
    notes = " | ".join(emit(_plan("cfg=2,pipefusion=2,dp=2,vae=2"), "diffusers").cannot_express)
    for words in ("PipeFusion", "cfg=2", "dp=2", "vae=2"):
        assert words in notes
    assert "no context-parallel plan" in " ".join(emit(_plan("ulysses=2"), "diffusers").cannot_express)


def test_diffusers_context_parallel_families_match_diffusers():
    import diffusers

    classes = {"flux": "FluxTransformer2DModel", "pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
               "hunyuan": "HunyuanDiT2DModel", "cogvideox": "CogVideoXTransformer3DModel",
               "latte": "LatteTransformer3DModel"}
    having = {family for family, name in classes.items() if getattr(getattr(diffusers, name), "_cp_plan", None)}
    assert having == set(DIFFUSERS_CP_FAMILIES)


def test_unknown_engine_is_refused_by_name():
    with pytest.raises(DitplanError, match="'sglang'"):
        emit(_plan("cfg=2"), "sglang")
