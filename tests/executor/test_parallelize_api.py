"""`executor.parallelize` in one process: plan forms, refusals, data-parallel shares, output shape."""
from __future__ import annotations

import pytest
import torch

import executor
from costmodel.config import ParallelConfig, Placement
from costmodel.errors import DitplanError
from executor.families import adapter_for
from executor.parallel import _dp_share, model_problems
from executor.tiny import build_tiny_pipeline
from planner.plan import Plan


@pytest.fixture(scope="module")
def pixart():
    torch.set_num_threads(1)
    return build_tiny_pipeline("tiny-pixart-alpha")


def make_plan(config: str, gpus: int) -> Plan:
    parsed = ParallelConfig.parse(config)
    return Plan(model="tiny-pixart-alpha", height=256, width=256, frames=1, steps=3, cluster="l40-pcie-8", gpus=gpus,
                config=parsed, placement=Placement(parsed))


@pytest.mark.timeout(120)
def test_plan_string_object_and_file_give_the_same_images(pixart, tmp_path):
    by_string = executor.parallelize(pixart, plan="cfg=1", show_progress=False)
    first = by_string(prompt=["a cat", "a dog"], num_inference_steps=2, seed=3, output_type="np").images
    assert first.shape == (2, 256, 256, 3)
    path = make_plan("cfg=1", 1).save(tmp_path / "plan.json")
    for plan in (make_plan("cfg=1", 1), str(path)):
        again = executor.parallelize(pixart, plan=plan, show_progress=False)
        assert (again(prompt=["a cat", "a dog"], num_inference_steps=2, seed=3, output_type="np").images == first).all()
    timings = by_string.last_timings
    assert len(timings.step_s) == 2 and timings.loop_s > 0 and timings.end_to_end_s >= timings.loop_s


@pytest.mark.timeout(120)
def test_seed_is_per_prompt_so_a_prompt_keeps_its_image_in_any_batch(pixart):
    parallel = executor.parallelize(pixart, plan="cfg=1", show_progress=False)
    pair = parallel(prompt=["a cat", "a dog"], num_inference_steps=2, seed=3, output_type="latent").images
    alone = parallel(prompt=["a cat"], num_inference_steps=2, seed=3, output_type="latent").images
    assert (pair[:1] - alone).abs().max() <= 1e-5


@pytest.mark.timeout(60)
def test_gpu_count_other_than_the_world_size_is_refused(pixart):
    with pytest.raises(DitplanError, match="uses 2 GPUs but this job has 1 process"):
        executor.parallelize(pixart, plan=make_plan("cfg=2", 2))
    with pytest.raises(DitplanError, match="uses 4 GPUs"):
        executor.parallelize(pixart, plan="ulysses=2,ring=2")


@pytest.mark.timeout(60)
def test_auto_needs_a_cluster(pixart):
    with pytest.raises(DitplanError, match="cluster"):
        executor.parallelize(pixart, plan="auto")


@pytest.mark.timeout(60)
def test_model_rules_name_the_numbers(pixart):
    adapter = adapter_for(pixart)
    problems = model_problems(ParallelConfig(ulysses=3), adapter, None, 256, 256, 1, 3)
    assert problems == ["ulysses=3 does not divide the transformer's 4 attention heads"]
    flux = adapter_for(build_tiny_pipeline("tiny-flux-schnell"))
    assert any("classifier-free guidance" in p for p in model_problems(ParallelConfig(cfg=2), flux, None, 256, 256, 1, 3))
    # With the model's profile, the cost model's rules join in (here: rows not splitting into patches).
    profiled = model_problems(ParallelConfig(pipefusion=2, patches=32), adapter, "tiny-pixart-alpha", 256, 256, 1, 3)
    assert any("token rows" in p for p in profiled)


def test_data_parallel_shares_are_contiguous_and_in_order():
    assert [_dp_share(5, 2, r) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [_dp_share(4, 4, r) for r in range(4)] == [[0], [1], [2], [3]]
    assert [_dp_share(1, 2, r) for r in range(2)] == [[0], []]


@pytest.mark.timeout(60)
def test_patch_sizes_the_executor_cannot_cut_are_refused_before_the_loop(pixart):
    # No model profile here (model=None), so only the executor's own shape checks can refuse: the
    # 256 px tiny PixArt has 16 token rows, so 17 patches leave one without a row.
    parallel = executor.parallelize(pixart, plan="patches=17,warmup=0", show_progress=False)
    parallel.model_id = None
    with pytest.raises(DitplanError, match="patches=17 exceeds the image's 16 token rows"):
        parallel(prompt="a cat", num_inference_steps=2, height=256, width=256, output_type="latent")
    # Latte's pipeline units are spatial + temporal block pairs: more stages than pairs cannot be cut.
    latte = adapter_for(build_tiny_pipeline("tiny-latte"))
    units = latte.transformer.config.num_layers
    assert model_problems(ParallelConfig(pipefusion=units + 1), latte, None, 0, 0, 1, 1) == [
        f"pipefusion={units + 1} exceeds the {units} pipeline units of this latte transformer; every stage needs at least one"]
