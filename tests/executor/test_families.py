"""The family declarations: each complete and consistent with itself and with the cost model, and a
cost-model family the executor does not declare refused by name before anything runs."""
from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from costmodel import specs
from costmodel.errors import DitplanError
from executor.families import DECLARATIONS, FAMILIES, MODULES, Family, adapter_for, declaration, family_of_pipeline_class
from executor.sp import SequenceParallelHandle, SequenceShard
from executor.tiny import tiny_model_per_family



@pytest.fixture
def undeclared(monkeypatch) -> str:
    """A cost-model family the executor is made not to declare (it declares every one): its name,
    and the families it then runs are the others."""
    import executor.families as families

    name = families.FAMILIES[-1]
    monkeypatch.setattr(families, "DECLARATIONS", {k: v for k, v in families.DECLARATIONS.items() if k != name})
    monkeypatch.setattr(families, "FAMILIES", tuple(f for f in families.FAMILIES if f != name))
    return name


def _model_of(family: str) -> str:
    """A built-in model profile of `family`."""
    return next(model_id for model_id in specs.list_models() if specs.load_model(model_id).family == family)


def test_every_module_declares_one_cost_model_family():
    assert len(DECLARATIONS) == len(MODULES), "two modules declare the same family"
    for module in MODULES:
        family = import_module(f"executor.families.{module}").FAMILY
        assert isinstance(family, Family)
        assert family.name in specs.FAMILIES, f"{module}: {family.name!r} is not a cost-model family"
        assert DECLARATIONS[family.name] is family
    pipelines = [pipeline for family in DECLARATIONS.values() for pipeline in family.pipelines]
    assert len(set(pipelines)) == len(pipelines), "a pipeline class is declared by two families"


@pytest.mark.parametrize("name", FAMILIES)
def test_declaration_parts_live_in_the_family_module_and_agree_on_its_name(name):
    family = DECLARATIONS[name]
    module = next(m for m in MODULES if import_module(f"executor.families.{m}").FAMILY is family)
    assert family.adapter.family == name and family.stages.family == name
    for part in (family.adapter, family.stages, family.install_sequence_parallel, family.tiny_transformer, family.describe_blocks):
        assert part.__module__ == f"executor.families.{module}", f"{name}: {part.__qualname__} is declared elsewhere"


@pytest.mark.parametrize("name", FAMILIES)
def test_default_model_ids_are_profiles_of_the_family(name):
    import diffusers

    family = DECLARATIONS[name]
    assert family.pipelines, f"{name}: no pipeline class"
    for pipeline, model_id in family.pipelines.items():
        assert hasattr(diffusers, pipeline), f"{name}: diffusers has no {pipeline}"
        assert family_of_pipeline_class(pipeline) == name
        model = specs.load_model(model_id)
        assert model.family == name, f"{pipeline} -> {model_id}, a {model.family} profile"
        assert model.text_joins_attention == family.joins_attention, f"{model_id}: joins_attention disagrees"


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_transformer_matches_its_stages_sp_installer_and_block_description(name):
    """One tiny build per family: the staged forward is the forward; the SP installer gives exactly
    the PipeFusion stale-KV layers the declared processor; the block description counts the blocks
    the stages run, of the kinds the family's profiles use; the one-block config keeps one block of
    each kind."""
    family = DECLARATIONS[name]
    tiny = family.tiny_transformer(seed=3)
    model = tiny.model
    stages = family.stages(model)
    kwargs = tiny.call_kwargs(500.0)
    with torch.no_grad():
        expected = model(**kwargs)[0]
        layout = stages.layout(tiny.latents, tiny.inputs, 1)
        got = stages.forward(tiny.latents, kwargs["timestep"], tiny.inputs, layout)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    handle = SequenceParallelHandle(SequenceShard(None, None))
    family.install_sequence_parallel(model, handle.shard, handle)
    try:
        installed = {id(module) for module in handle.layers}
        assert installed and all(isinstance(module.processor, family.sp_processor) for module in handle.layers)
        assert installed == {id(module) for module, _ in stages.stale_layers(range(stages.unit_count()))}
    finally:
        handle.remove()

    description = family.describe_blocks(model)
    blocks = sum(len(stages.unit_modules(unit)) for unit in range(stages.unit_count()))
    assert sum(group["count"] for group in description.blocks) == blocks
    profile_kinds = {group.kind for model_id in family.pipelines.values() for group in specs.load_model(model_id).blocks}
    assert {group["kind"] for group in description.blocks} == profile_kinds
    assert 0 < description.mlp_width

    small = type(model).from_config({**model.config, **family.one_block_config})
    small_stages = family.stages(small)
    kinds = {id(blocks) for unit in range(stages.unit_count()) for blocks, _ in stages.unit_modules(unit)}
    assert sum(len(small_stages.unit_modules(unit)) for unit in range(small_stages.unit_count())) == len(kinds)

    if family.checkpoint_of is not None:
        assert specs.load_model(family.checkpoint_of(SimpleNamespace(transformer=model))).family == name


def test_every_family_has_a_tiny_pipeline_model():
    assert set(tiny_model_per_family()) == set(FAMILIES)


# -- a cost-model family the executor does not run ------------------------------------------------
def _names_family_and_executor_families(message: str, family: str) -> None:
    import executor.families as families

    assert repr(family) in message, message
    assert all(name in message for name in families.FAMILIES), message


def test_undeclared_family_is_refused_by_name(undeclared):
    with pytest.raises(DitplanError) as refusal:
        declaration(undeclared)
    _names_family_and_executor_families(str(refusal.value), undeclared)


def test_parallelize_refuses_a_model_of_an_undeclared_family_before_anything_runs(undeclared):
    from executor.parallel import parallelize

    model_id = _model_of(undeclared)
    with pytest.raises(DitplanError) as refusal:
        parallelize(object(), plan="cfg=1", model=model_id)
    _names_family_and_executor_families(str(refusal.value), undeclared)
    assert model_id in str(refusal.value)


def test_an_unknown_pipeline_class_is_refused_by_name():
    with pytest.raises(DitplanError) as refusal:
        adapter_for(SimpleNamespace())
    assert "SimpleNamespace" in str(refusal.value) and all(name in str(refusal.value) for name in FAMILIES)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from executor.launch import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_ditplan_run_refuses_an_undeclared_family_before_any_process_starts(undeclared, tmp_path, capsys):
    model_id = _model_of(undeclared)
    path = specs.MODELS_DIR / f"{model_id}.yaml"
    for model in (model_id, str(path)):  # a profile id is refused for what it is; its YAML path for its family
        code, err = _run(["--model", model, "--plan", "cfg=1", "--nproc", "1", "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "x").exists()
    _names_family_and_executor_families(err, undeclared)


def test_ditplan_run_refuses_a_pipeline_folder_the_executor_does_not_run(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    code, err = _run(["--model", str(folder), "--plan", "cfg=1", "--nproc", "1", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("error:") == 1, err
    assert "StableDiffusionPipeline" in err and all(name in err for name in FAMILIES), err
    assert not Path(tmp_path / "x").exists()
