"""`costmodel.profiler.module_count`: counting at the profile's precision, and the operator report the
counts and the CPU profile's elementwise curve share."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from costmodel.profiler.compute_bench import block_elementwise_samples, pixart_block  # noqa: E402
from costmodel.profiler.module_count import count_block_operations, operator_modes  # noqa: E402
from costmodel.specs import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from published_transformers import build  # noqa: E402


def _count(model_id: str, dtype_bytes: int) -> dict[str, tuple[float, float]]:
    spec = dataclasses.replace(load_model(model_id), dtype_bytes=dtype_bytes)
    with torch.device("meta"):
        module = build(model_id).eval()
    return count_block_operations(module, spec, 256, 256, 1)


def test_a_block_without_upcasts_counts_the_same_passes_at_either_precision():
    """PixArt's blocks compute in the module's dtype throughout: bf16 moves half fp32's bytes over a
    slab of half the bytes, so kernels and passes per row agree."""
    bf16, fp32 = _count("pixart-alpha", 2), _count("pixart-alpha", 4)
    assert bf16["cross"][0] == fp32["cross"][0]
    assert bf16["cross"][1] == pytest.approx(fp32["cross"][1], rel=0.01)


def test_fp32_upcasts_are_kernels_and_bytes_of_their_own_in_bf16():
    """SD3.5-large's q/k RMSNorm runs in fp32: in a bf16 module the casts launch kernels and move
    4-byte elements, which an fp32 count cannot see."""
    bf16, fp32 = _count("sd3.5-large", 2), _count("sd3.5-large", 4)
    assert bf16["joint"][0] > fp32["joint"][0]
    assert bf16["joint"][1] > fp32["joint"][1]


def test_the_count_keeps_the_tensors_diffusers_loads_in_fp32():
    """Wan keeps its norms, rotary embedding and modulation table in fp32 under torch_dtype=bf16."""
    spec = load_model("wan2.1-t2v-1.3b")
    with torch.device("meta"):
        module = build("wan2.1-t2v-1.3b").eval()
    count_block_operations(module, spec, 256, 256, 5)
    dtypes = {name: p.dtype for name, p in module.named_parameters()}
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16


def test_an_attention_call_is_reported_once_and_matmuls_carry_no_bytes():
    block = pixart_block(32, head_dim=16)
    reports: list[tuple[str, float, float]] = []
    with torch.no_grad(), operator_modes(lambda *report: reports.append(report)):
        block(torch.randn(1, 8, 32), encoder_hidden_states=torch.randn(1, 4, 32), timestep=torch.randn(1, 6 * 32))
    names = [name for name, _, _ in reports]
    assert names.count("attention") == 2  # self-attention and cross-attention
    assert all(nbytes == 0 for name, nbytes, _ in reports if name in ("addmm", "mm", "attention"))
    assert any(nbytes > 0 for name, nbytes, _ in reports if name not in ("addmm", "mm", "attention"))
    assert all(seconds >= 0 for _, _, seconds in reports)


def test_block_elementwise_samples_give_one_pass_per_slab_size():
    samples = block_elementwise_samples((16, 256))
    assert [sample.size for sample in samples] == [16 * 256 * 4, 256 * 256 * 4]
    assert all(0 < sample.seconds < 1 for sample in samples)
    assert samples[1].seconds > samples[0].seconds  # 16 times the bytes per pass
