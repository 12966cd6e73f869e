"""PipeFusion and sequence parallelism in bf16 on two CPU processes (the dtype GPUs from sm80 run):
every message and collective carries bf16, the recorded calls replay under NCCL's rules, and the
final latents match the one-process loop in bf16 within bf16's rounding (relative L2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from comm_worker import PROMPTS  # noqa: E402
from executor_spawn import assert_follows_nccl_rules, recorded_communication, run_ranks  # noqa: E402

WORKER = Path(__file__).parent / "comm_worker.py"
STEPS = 3


def _reference(plan: str) -> torch.Tensor:
    from costmodel.config import ParallelConfig
    from executor.families import GenerationRequest, adapter_for
    from executor.loop import denoise
    from executor.tiny import build_tiny_pipeline

    config = ParallelConfig.parse(plan)
    adapter = adapter_for(build_tiny_pipeline("tiny-pixart-alpha", seed=0).to(torch.bfloat16))
    request = GenerationRequest(prompts=PROMPTS, num_inference_steps=STEPS,
                                generators=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))])
    with torch.no_grad():
        return denoise(adapter.prepare(request), adapter, ParallelConfig(patches=config.patches, warmup=config.warmup))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("plan", ["pipefusion=2,patches=2,warmup=1", "ulysses=2", "ring=2"])
def test_bf16_run_on_two_ranks(tmp_path, plan):
    out = tmp_path / "latents.pt"
    with recorded_communication(tmp_path / "communication") as calls:
        outcomes = run_ranks(WORKER, 2, ["tiny-pixart-alpha", plan, str(STEPS), "bfloat16", str(out)], deadline_s=360)
    for rank, (code, output) in enumerate(outcomes):
        assert code == 0, f"rank {rank} exited with {code}:\n{output[-3000:]}"
    assert_follows_nccl_rules(calls)
    records = [json.loads(line) for f in sorted(calls.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]
    payloads = [r for r in records if "dtype" in r] + [op for r in records if r["op"] == "batch" for op in r["ops"]]
    # Shape agreement sends int64 sizes; everything else is the model's data, in bf16.
    assert payloads and {p["dtype"] for p in payloads} <= {"bfloat16", "int64"}
    assert any(p["dtype"] == "bfloat16" for p in payloads)
    latents, reference = torch.load(out), _reference(plan)
    assert latents.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (relative rounding 2^-9); the split orders sums differently and the
    # sampler carries the differences through the steps: about 1% relative, where a wrong result is O(1).
    error = ((latents.float() - reference.float()).norm() / reference.float().norm()).item()
    assert error <= 2e-2, error
