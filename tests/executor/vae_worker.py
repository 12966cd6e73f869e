"""One rank of the patch-parallel VAE test: decode a seeded latent alone and in strips, report on rank 0.

Args: MODEL_ID LATENT_HEIGHT LATENT_WIDTH OUT_JSON. The decode group is the whole world.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from executor.tiny import load_tiny_spec  # noqa: E402
from executor.vae import DecodeGroup, strip_parallel  # noqa: E402


def build_vae(model_id: str) -> torch.nn.Module:
    import diffusers

    recipe = load_tiny_spec(model_id)["build"]["components"]["vae"]
    torch.manual_seed(0)
    return getattr(diffusers, recipe["class"])(**recipe["config"]).eval()


def eight_bit(image: torch.Tensor) -> torch.Tensor:
    """The decoder's [-1, 1] output as the pipelines' postprocessing turns it into 8-bit levels."""
    return (image / 2 + 0.5).clamp(0, 1).mul(255).round()


def main() -> None:
    model_id, height, width, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    vae = build_vae(model_id)
    channels = vae.config.latent_channels
    shape = (1, channels, 2, height, width) if "CogVideoX" in type(vae).__name__ else (1, channels, height, width)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    group = DecodeGroup(ranks=list(range(world)), rank=rank, group=dist.new_group(list(range(world))))
    with torch.no_grad():
        with strip_parallel(vae, group):
            split = vae.decode(latent, return_dict=False)[0]
        alone = vae.decode(latent, return_dict=False)[0] if rank == 0 else None
    if rank == 0:
        out.write_text(json.dumps({
            "shape_alone": list(alone.shape), "shape_split": list(split.shape),
            "max_levels": float((eight_bit(split) - eight_bit(alone)).abs().max()),
            "max_abs": float((split - alone).abs().max()), "spread": float(alone.std()),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
