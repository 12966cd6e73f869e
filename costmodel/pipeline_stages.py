"""The pipeline around the denoising loop: text encoding, the VAE decode (one rank or `vae` ranks in
row strips), the transfers between them, and the end-to-end latency; and where they put memory.

Where the executor runs them (executor/parallel.py, executor/vae.py): every rank loads the whole
pipeline and encodes the prompts itself (so text embeddings never travel); the final latent goes
from the replica leader to its decode ranks (a broadcast); each decode rank decodes a strip of rows,
exchanging one halo row per 3x3 convolution with each neighbour, all-reducing every GroupNorm's
statistics and all-gathering the mid-block attention's keys and values; the strips are gathered on
the leader; with data parallelism the replica leaders' images are gathered on rank 0.

The decoder's shape is that of the SD-family AutoencoderKL (block channels 128/256/512/512, three
resnets per up block), which PixArt, SD3, Flux, HunyuanDiT and Latte use and CogVideoX's 3D VAE
resembles. A VAE of other size scales its channel widths with the square root of its parameter count
(parameters grow with width squared).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from costmodel import compute
from costmodel.config import ParallelConfig, Placement

GIB = 2**30
# The VAE decode's FLOP rate as a fraction of the large-GEMM one, measured on an H200 with eager
# diffusers in bf16 (benchmarks/gpu_check.py --vae): the SD-family decoder at 1024 and 2048 px ran at
# 0.13 and 0.14 of it, HunyuanVideo's tiled 720p x 129-frame decode at 0.17. GroupNorm, SiLU and
# upsampling passes over full-resolution maps and cuDNN's convolutions at 128-512 channels keep it
# far below the GEMM rate. Text encoders run as large GEMMs.
VAE_EFFICIENCY_SCALE = 0.14
# Parameters of the SD-family AutoencoderKL whose decoder shape the constants below describe.
REFERENCE_VAE_PARAMS = 83.65e6
# Live activation channels per output pixel at the decoder's peak: the first full-resolution resnet
# holds its 256-channel input, its GroupNorm output and the activation of that (3 x 256).
PEAK_CHANNELS = 3 * 256
# Summed input channels of the 3x3 convolutions, in full-width rows (a level at width W/2^k counts
# 1/2^k): 642 at W/8 (conv_in, mid block, first up block), 896 at W/4, 1152 at W/2, 1280 at W.
HALO_CHANNELS = 3970
CONVOLUTIONS = 33  # 3x3 convolutions, each one halo exchange
GROUP_NORMS = 30  # each one all-reduce of (count, sum, sum of squares) per group
NORM_GROUPS = 32
MID_CHANNELS = 512  # the mid-block attention's width, at the latent's resolution
# Families whose decoder has the mid-block self-attention (CogVideoX's 3D decoder has none).
NO_MID_ATTENTION = ("cogvideox",)
# Latent frames a video VAE decodes per call, which bounds its activations: CogVideoX's frame batch (2);
# Wan's causal decoder, one latent frame at a time with its feature cache; HunyuanVideo's temporal
# tiles of 16 output frames (4 latent frames), which its pipelines turn on for 720p. The others
# decode every frame at once.
LATENT_FRAMES_PER_CALL = {"cogvideox": 2, "wan": 1, "hunyuan-video": 4}
# Families whose VAE decoder cannot run in row strips (the executor refuses vae > 1 for them): Wan's
# and HunyuanVideo's causal 3-D convolutions pad inside their forward, and Qwen-Image's VAE, built like
# Wan's, also projects its mid-block attention with one 1x1 convolution; a strip's halo exchange sees
# neither; SANA's deep-compression VAE attends over the whole latent in its deeper stages.
WHOLE_DECODE = {
    "sana": ("the SANA deep-compression VAE (AutoencoderDC) cannot decode in row strips (its deeper stages attend "
             "over the whole latent with linear attention)"),
    "wan": "the Wan VAE decoder cannot run in row strips (its causal 3-D convolutions pad inside their forward)",
    "qwen-image": ("the Qwen-Image VAE cannot decode in row strips (its causal 3-D convolutions pad inside their "
                   "forward, and its mid-block attention projects with one 1x1 convolution)"),
    "hunyuan-video": ("the HunyuanVideo VAE decoder cannot run in row strips (its causal 3-D convolutions pad inside "
                      "their forward)"),
}
OUTPUT_CHANNELS = 3


@lru_cache(maxsize=4096)
def decode_groups(config: ParallelConfig, placement_order: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Per data-parallel replica (in dp order), the global ranks that decode its images together:
    the replica's `vae` lowest ranks (its leader first, then the ranks nearest to it)."""
    strides: dict[str, int] = {}
    world = 1
    for axis in placement_order:
        strides[axis] = world
        world *= config.degree(axis)
    offsets = [0]
    for axis in placement_order:
        if axis != "dp":
            offsets = [offset + c * strides[axis] for offset in offsets for c in range(config.degree(axis))]
    lowest = sorted(offsets)[: config.vae]
    return tuple(tuple(d * strides["dp"] + offset for offset in lowest) for d in range(config.dp))


@dataclass(frozen=True)
class StagePrices:
    """Seconds and memory of the stages around the loop, for one generation (one prompt per replica)."""

    text_encode_s: float
    latent_transfer_s: float  # leader -> its decode ranks (vae > 1)
    vae_compute_s: float  # the largest strip's decode
    vae_comm_s: float  # halo exchanges, GroupNorm all-reduces, attention K/V gathers, strip gather
    image_gather_s: float  # replica leaders' images -> rank 0 (dp > 1)
    decode_activations_gib: float  # per decode rank, at the decoder's peak
    vae: int

    @property
    def vae_decode_s(self) -> float:
        return self.vae_compute_s + self.vae_comm_s

    def end_to_end_s(self, loop_s: float) -> float:
        return self.text_encode_s + loop_s + self.latent_transfer_s + self.vae_decode_s + self.image_gather_s

    def to_dict(self) -> dict[str, float]:
        return {"text_encode_s": self.text_encode_s, "latent_transfer_s": self.latent_transfer_s,
                "vae_compute_s": self.vae_compute_s, "vae_comm_s": self.vae_comm_s,
                "image_gather_s": self.image_gather_s, "decode_activations_gib": self.decode_activations_gib,
                "vae": self.vae}


def _width_scale(model: Any) -> float:
    return math.sqrt(model.vae_params / REFERENCE_VAE_PARAMS)


def _decoded_frames(model: Any, frames: int) -> tuple[int, int]:
    """(latent frames, output frames) the decoder holds in one call."""
    latent = model.latent_frames(frames)
    per_call = LATENT_FRAMES_PER_CALL.get(model.family)
    if per_call is None or per_call >= latent:
        return latent, frames
    return per_call, per_call * model.vae_temporal_factor


def decode_activations_gib(model: Any, height: int, width: int, frames: int, vae: int = 1) -> float:
    """Peak activation memory of one decode rank: its strip's share of the full-resolution peak,
    plus the whole latent's attention keys and values (gathered on every rank)."""
    latent_rows = height // model.vae_spatial_factor
    share = math.ceil(latent_rows / vae) / latent_rows
    _, out_frames = _decoded_frames(model, frames)
    scale = _width_scale(model)
    b = model.dtype_bytes
    peak = PEAK_CHANNELS * scale * height * width * out_frames * b * share
    if model.family not in NO_MID_ATTENTION:
        tokens = latent_rows * (width // model.vae_spatial_factor) * out_frames
        peak += 2 * tokens * MID_CHANNELS * scale * b
    return peak / GIB


def _collective(cluster: Any, pattern: str, groups: tuple[tuple[int, ...], ...], nbytes: float) -> float:
    return cluster.comm_time(pattern, groups, nbytes)[0]


def price_stages(model: Any, cluster: Any, config: ParallelConfig, placement: Placement, height: int, width: int,
                 frames: int) -> StagePrices:
    """Price text encoding, the VAE decode over `config.vae` ranks and the transfers around them."""
    hw, b = cluster.hardware, model.dtype_bytes
    prompts = 2 if model.uses_cfg else 1  # the negative prompt is encoded too
    text_flops = sum(2.0 * encoder.params * model.text_tokens * prompts for encoder in model.encoders)
    text_s = compute.dense_seconds(hw, text_flops)

    n = config.vae
    latent_rows = height // model.vae_spatial_factor
    latent_cols = width // model.vae_spatial_factor
    share = math.ceil(latent_rows / n) / latent_rows
    scale = _width_scale(model)
    conv_flops = height * width * frames * model.vae_decode_flops_per_pixel * share
    attention_flops = 0.0
    if model.family not in NO_MID_ATTENTION:
        # Per frame: the strip's queries against every key of the frame, at the latent's resolution.
        tokens = latent_rows * latent_cols
        attention_flops = model.latent_frames(frames) * 4.0 * tokens * share * tokens * MID_CHANNELS * scale
    vae_compute_s = compute.dense_seconds(hw, conv_flops + attention_flops, VAE_EFFICIENCY_SCALE)

    groups = decode_groups(config, tuple(placement.order))
    latent_bytes = (model.vae_latent_channels * latent_rows * latent_cols * model.latent_frames(frames) * b)
    image_bytes = OUTPUT_CHANNELS * height * width * frames * b
    latent_transfer_s = vae_comm_s = 0.0
    if n > 1:
        latent_transfer_s = _collective(cluster, "p2p", groups, latent_bytes)
        latent_frames, out_frames = _decoded_frames(model, frames)
        calls = math.ceil(model.latent_frames(frames) / latent_frames)
        halo_bytes = HALO_CHANNELS * scale * width * out_frames * b
        halo_s = CONVOLUTIONS * _collective(cluster, "p2p", groups, halo_bytes / CONVOLUTIONS)
        norm_bytes = 3 * NORM_GROUPS * 8 / n  # float64 statistics; an all-reduce moves ~2x an all-gather's slab
        norms_s = GROUP_NORMS * 2 * _collective(cluster, "all_gather", groups, norm_bytes)
        kv_s = 0.0
        if model.family not in NO_MID_ATTENTION:
            slab = latent_rows * latent_cols * latent_frames * MID_CHANNELS * scale * b * share
            kv_s = 2 * _collective(cluster, "all_gather", groups, slab)
        gather_s = _collective(cluster, "p2p", groups, image_bytes * (n - 1) / n)
        vae_comm_s = calls * (halo_s + norms_s + kv_s) + gather_s
    image_gather_s = 0.0
    if config.dp > 1:
        # uint8 images, one replica leader after another into rank 0.
        leaders = [group[0] for group in groups]
        image_gather_s = sum(_collective(cluster, "p2p", ((leaders[0], leader),), image_bytes / b)
                             for leader in leaders[1:])
    return StagePrices(
        text_encode_s=text_s, latent_transfer_s=latent_transfer_s, vae_compute_s=vae_compute_s,
        vae_comm_s=vae_comm_s, image_gather_s=image_gather_s,
        decode_activations_gib=decode_activations_gib(model, height, width, frames, n), vae=n,
    )


def vae_choices(config: ParallelConfig, model: Any, height: int) -> list[int]:
    """The decode rank counts a replica of `config` allows: divisors of its rank count, at most one
    latent row per rank."""
    if model.family in WHOLE_DECODE:
        return [1]
    replica = config.world_size // config.dp
    latent_rows = height // model.vae_spatial_factor
    return [n for n in range(1, replica + 1) if replica % n == 0 and n <= latent_rows]


def choose_vae(model: Any, cluster: Any, config: ParallelConfig, placement: Placement, height: int, width: int,
               frames: int, memory_left_gib: float) -> int:
    """The decode rank count that decodes fastest among those whose activations fit in
    `memory_left_gib` (the GPU's memory minus what the loop leaves allocated); fewest ranks on a tie."""
    best: tuple[bool, float, int] | None = None
    for n in vae_choices(config, model, height):
        candidate = ParallelConfig(cfg=config.cfg, ulysses=config.ulysses, ring=config.ring, pipefusion=config.pipefusion,
                                   dp=config.dp, patches=config.patches, warmup=config.warmup, vae=n)
        prices = price_stages(model, cluster, candidate, Placement(candidate, placement.order), height, width, frames)
        key = (prices.decode_activations_gib > memory_left_gib,
               prices.latent_transfer_s + prices.vae_decode_s, n)
        if best is None or key < best:
            best = key
    return best[2] if best else 1


def memory_note(memory: dict[str, float], capacity_gib: float) -> str:
    """For a plan that does not fit: whether it would fit with the text encoders and VAE elsewhere."""
    decode = memory.get("decode_extra_gib", 0.0)
    held = memory.get("encoders_vae_gib", 0.0) + decode
    without = sum(memory.values()) - held
    note = ""
    if held and without <= capacity_gib:
        note = (f"; it fits only with the text encoders and VAE elsewhere ({without:.1f} GiB without their "
                f"{held:.1f} GiB: the executor keeps them on every GPU)")
    if decode:
        note += f"; more VAE decode ranks (vae=N) divide the decode's {decode:.1f} GiB above the loop's peak"
    return note
