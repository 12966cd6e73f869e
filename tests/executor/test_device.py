"""What the executor does on CUDA machines, checked on the CPU with torch.cuda mocked: each rank binds
its GPU and joins with device_id, more processes than GPUs are refused, the dtype follows the GPU,
timed regions wait for the GPU, errors of NCCL are named, outputs leave the GPU before an object
gather, Ring's merge kernel follows the GPU, and per-layer paths make no host copies."""
from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
import torch.distributed as dist

from costmodel.errors import DitplanError
from executor import device as executor_device
from executor import groups, worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cuda(monkeypatch):
    """A node with 4 GPUs of compute capability 8.0 as torch.cuda reports it; records set_device."""
    calls = SimpleNamespace(set_device=[], synchronize=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.set_device.append(device))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.synchronize.append(device))
    return calls


@pytest.fixture
def joined(monkeypatch):
    """init_process_group replaced by a recorder of its arguments."""
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    return seen


def _torchrun_env(monkeypatch, world: int, local_rank: int, local_world: int) -> None:
    for name, value in {"WORLD_SIZE": world, "RANK": local_rank, "LOCAL_RANK": local_rank,
                        "LOCAL_WORLD_SIZE": local_world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(name, str(value))


def test_every_cuda_rank_binds_its_gpu_and_joins_with_device_id(monkeypatch, cuda, joined):
    _torchrun_env(monkeypatch, world=2, local_rank=1, local_world=2)
    groups.init_distributed()
    assert cuda.set_device == [torch.device("cuda", 1)]
    assert joined["backend"] == "nccl" and joined["device_id"] == torch.device("cuda", 1)


def test_a_one_process_cuda_run_binds_its_gpu_too(monkeypatch, cuda, joined):
    _torchrun_env(monkeypatch, world=1, local_rank=0, local_world=1)
    groups.init_distributed()
    assert cuda.set_device == [torch.device("cuda", 0)] and joined == {}


def test_more_processes_than_visible_gpus_are_refused_before_joining(monkeypatch, cuda, joined):
    _torchrun_env(monkeypatch, world=8, local_rank=0, local_world=8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(DitplanError, match=r"8 processes on this node but only 4 visible GPU\(s\).*--nproc 4"):
        groups.init_distributed()
    assert joined == {} and cuda.set_device == []
    executor_device.check_visible_gpus(4)


def test_cpu_runs_join_gloo_without_a_device(monkeypatch, joined):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _torchrun_env(monkeypatch, world=2, local_rank=0, local_world=2)
    groups.init_distributed()
    assert joined["backend"] == "gloo" and joined["device_id"] is None
    executor_device.check_visible_gpus(64)  # no GPU: any count of CPU processes


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_compute_dtype_follows_the_gpu(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert executor_device.compute_dtype(torch.device("cuda", 0)) == dtype
    assert executor_device.compute_dtype(torch.device("cpu")) == torch.float32


def test_a_pipeline_loads_in_the_chosen_dtype_even_where_diffusers_ignores_it(monkeypatch, tmp_path):
    """diffusers before 0.36 drop from_pretrained's `dtype`: the loaded modules must still end in it."""
    import diffusers

    from executor.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline("tiny-pixart-alpha", tmp_path / "pipe")
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def ignoring_dtype(cls, *args, dtype=None, **kwargs):
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(ignoring_dtype))
    monkeypatch.setattr(executor_device, "compute_dtype", lambda device: torch.bfloat16)
    pipe = worker.load_pipeline(str(folder), "cfg=1")
    for name in ("transformer", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name


def test_timed_regions_wait_for_the_gpu(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (cuda.synchronize.append(device), time.sleep(0.05)))
    gpu = torch.device("cuda", 0)
    started = executor_device.now(gpu)
    assert executor_device.seconds_since(started, gpu) >= 0.05  # the wait for the queued work counts
    assert cuda.synchronize == [gpu, gpu]
    assert executor_device.peak_memory_bytes(torch.device("cpu")) is None


def test_no_executor_module_reads_the_clock_without_synchronising():
    """Every timed region of the executor goes through executor.device (now / seconds_since)."""
    unsynchronised = [str(path.relative_to(ROOT)) for path in (ROOT / "executor").rglob("*.py")
                      if path.name not in ("device.py", "worker.py") and "perf_counter(" in path.read_text()]
    assert unsynchronised == []


@pytest.mark.parametrize("message", [
    "NCCL error in: ProcessGroupNCCL.cpp:2010, unhandled cuda error, NCCL version 2.21.5",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLGATHER) ran for 180000 "
    "milliseconds before timing out.",
])
def test_nccl_errors_and_timeouts_are_reported_as_they_are(monkeypatch, capsys, message):
    def failing(args):
        raise RuntimeError(message)

    monkeypatch.setattr(worker, "run_worker", failing)
    monkeypatch.setattr("executor.launch.build_parser", lambda: SimpleNamespace(parse_args=lambda argv: None))
    assert worker.main([]) == 1
    err = capsys.readouterr().err
    assert message in err and "another rank failed" not in err


def test_a_closed_connection_is_reported_as_another_rank_failing():
    assert worker._is_peer_loss(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"))
    assert not worker._is_peer_loss(RuntimeError("NCCL communicator was aborted: connection closed"))


def test_replica_outputs_leave_the_gpu_before_the_object_gather(monkeypatch):
    from executor.parallel import ParallelPipeline

    sent = []
    monkeypatch.setattr(dist, "gather_object", lambda obj, gathered, dst: sent.append(obj))
    on_gpu = MagicMock(spec=torch.Tensor)
    fake = SimpleNamespace(rank=1, groups=SimpleNamespace(world_size=2))
    ParallelPipeline._gather_replicas(fake, [on_gpu])
    assert sent == [[on_gpu.cpu.return_value]]


@pytest.mark.parametrize("capability, dtype, head_dim, kernel", [
    ((9, 0), torch.bfloat16, 128, "flash"), ((8, 0), torch.float16, 64, "flash"),
    ((8, 0), torch.float32, 64, "efficient"), ((9, 0), torch.bfloat16, 512, "efficient"),
    ((7, 5), torch.float16, 64, "efficient"), ((7, 0), torch.float32, 64, "efficient"),
    ((7, 0), torch.bfloat16, 64, "reference"),
])
def test_ring_merge_kernel_follows_the_gpu(monkeypatch, capability, dtype, head_dim, kernel):
    from executor.sp.attention import lse_kernel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert lse_kernel(torch.device("cuda", 0), dtype, head_dim) == kernel
    assert lse_kernel(torch.device("cpu"), dtype, head_dim) == "cpu-flash"


def test_ring_attention_falls_back_to_the_reference_kernel(monkeypatch):
    from executor.sp import attention

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 8, generator=generator) for _ in range(3))
    fused = attention.attention_with_lse(query, key, value)
    monkeypatch.setattr(attention, "lse_kernel", lambda device, dtype, head_dim: "reference")
    reference = attention.attention_with_lse(query, key, value)
    torch.testing.assert_close(reference[0], fused[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(reference[1], fused[1], atol=1e-5, rtol=0)


def test_input_shapes_are_agreed_once_per_generation_not_at_every_forward(monkeypatch):
    """The shape check gathers and reads sizes on the host: once per generation, then skipped."""
    import executor.sp as sp
    from executor.sp.processors import SequenceShard

    agreed = []
    monkeypatch.setattr(sp, "agree_shapes", lambda shapes, group, what: agreed.append(group))
    shard = SequenceShard("ulysses-group", "ring-group")
    hook = sp._agree_on_inputs(shard)
    latents = torch.zeros(2, 4, 8, 8)
    for _ in range(3):
        hook(None, (latents,), {"timestep": torch.zeros(2)})
    assert agreed == ["ulysses-group", "ring-group"]
    hook(None, (torch.zeros(2, 4, 16, 16),), {"timestep": torch.zeros(2)})  # new shapes: checked again
    sp.SequenceParallelHandle(shard).new_generation()
    hook(None, (torch.zeros(2, 4, 16, 16),), {"timestep": torch.zeros(2)})
    assert len(agreed) == 6


def test_patch_indices_are_made_once_per_device_not_at_every_layer():
    from executor.pipefusion.layout import PatchLayout, put_tokens, take_tokens

    layout = PatchLayout(token_rows=4, row_tokens=2, latent_rows_per_token_row=2, token_frames=3, patches=2)
    first = layout.token_index(1, torch.device("cpu"))
    assert layout.token_index(1, torch.device("cpu")) is first
    tokens = torch.arange(24.0).reshape(1, 24, 1)
    taken = take_tokens(tokens, first, dim=1)
    assert taken.flatten().tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    put_tokens(tokens, first, 1, torch.zeros_like(taken))
    assert tokens[0, first].abs().sum() == 0


def test_no_per_layer_path_copies_indices_to_the_host():
    """`.item()`/`.tolist()`/`.cpu()` would make the host wait for the GPU in every forward."""
    hot = [ROOT / "executor/sp/processors.py", ROOT / "executor/sp/attention.py", ROOT / "executor/pipefusion/stale_kv.py",
           ROOT / "executor/pipefusion/layout.py", ROOT / "executor/pipefusion/hybrid.py"]
    found = [f"{path.name}: {line.strip()}" for path in hot for line in path.read_text().splitlines()
             if re.search(r"\.(item|tolist|cpu)\(\)", line)]
    assert found == []


@pytest.mark.parametrize("rank, code, printed", [(0, 2, True), (1, 0, False)])
def test_a_refusal_is_printed_by_rank_0_and_the_others_leave_at_once(monkeypatch, capsys, rank, code, printed):
    def refusing(args):
        raise DitplanError("plan ulysses=3 cannot run this model: 3 does not divide 4 heads.")

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(worker, "run_worker", refusing)
    monkeypatch.setattr("executor.launch.build_parser", lambda: SimpleNamespace(parse_args=lambda argv: None))
    started = time.monotonic()
    assert worker.main([]) == code
    assert time.monotonic() - started < 5
    assert ("error: plan ulysses=3" in capsys.readouterr().err) == printed
