"""Model and cluster profiles: the catalogue loads, and every schema break is a DitplanError naming file, key, rule."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from costmodel import DitplanError, list_clusters, list_models, load_cluster, load_model
from costmodel.specs import MODELS_DIR
from costmodel.topology import CLUSTERS_DIR

REAL_MODELS = ["pixart-alpha", "pixart-sigma", "sd3-medium", "flux-dev", "flux-schnell", "hunyuan-dit",
               "cogvideox-2b", "cogvideox-5b", "latte", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b",
               "hunyuan-video", "qwen-image", "sana-1600m", "cogvideox1.5-5b", "consisid", "sd3.5-large"]
CLUSTERS = ["a100-sxm-nvlink-8", "a100-pcie-4", "h100-sxm-nvlink-8", "h200-sxm-nvlink-8", "h20-nvlink-8",
            "l40-pcie-8", "l40-pcie-8x2-eth", "l20-pcie-8", "rtx4090-pcie-8", "t4-pcie-4", "v100-nvlink-8"]


def test_catalogue_has_every_design_id():
    assert set(REAL_MODELS) <= set(list_models())
    assert set(CLUSTERS) <= set(list_clusters())


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_models_carry_published_structure(name):
    spec = load_model(name)
    assert spec.num_heads * spec.head_dim == spec.hidden_size
    assert spec.params > 1e8 and spec.encoder_params > 1e8 and spec.vae_params > 1e7
    assert "diffusers" in spec.source


def test_figures_of_selected_models():
    flux = load_model("flux-dev")
    assert [(g.kind, g.count) for g in flux.blocks] == [("joint", 19), ("single", 38)]
    assert (flux.hidden_size, flux.num_heads, flux.head_dim, flux.text_tokens) == (3072, 24, 128, 512)
    assert not flux.uses_cfg and flux.text_joins_attention
    assert load_model("flux-schnell").text_tokens == 256
    sd3 = load_model("sd3-medium")
    assert (sd3.num_blocks, sd3.hidden_size, sd3.text_tokens, sd3.in_channels) == (24, 1536, 333, 16)
    hunyuan = load_model("hunyuan-dit")
    assert hunyuan.skip_connections and hunyuan.num_blocks == 40 and hunyuan.head_dim == 88
    latte = load_model("latte")
    assert latte.block_sequence[:4] == ("cross", "temporal", "cross", "temporal") and latte.num_blocks == 56
    cog = load_model("cogvideox-5b")
    assert cog.token_grid(480, 720, 49) == (13, 30, 45) and cog.image_tokens(480, 720, 49) == 17550
    assert load_model("pixart-alpha").image_tokens(1024, 1024, 1) == 4096


def test_counted_operator_figures_replace_the_family_figures(tmp_path):
    from costmodel.flops import KERNELS_AND_PASSES, kernels_and_passes

    sd35 = load_model("sd3.5-large")  # q/k RMSNorm: more operators than the family's SD3-medium
    assert kernels_and_passes(sd35, "joint") == (sd35.blocks[0].kernels, sd35.blocks[0].passes)
    assert kernels_and_passes(sd35, "joint")[0] > KERNELS_AND_PASSES[("sd3", "joint")][0] + 20
    data = yaml.safe_load((MODELS_DIR / "sd3.5-large.yaml").read_text())
    for group in data["transformer"]["blocks"]:
        del group["kernels"], group["passes"]
    written = load_model(str(_write(tmp_path, "uncounted.yaml", data)))
    assert written.blocks[0].kernels is None
    assert kernels_and_passes(written, "joint") == KERNELS_AND_PASSES[("sd3", "joint")]


def test_tiny_models_with_build_section_load():
    tiny = [name for name in list_models() if name.startswith("tiny-")]
    for name in tiny:
        assert load_model(name).id == name


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _model_data() -> dict:
    return yaml.safe_load((MODELS_DIR / "pixart-alpha.yaml").read_text())


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(colour="red"), ["unknown key 'colour'"]),
    (lambda d: d["transformer"].pop("hidden_size"), ["missing field 'hidden_size'", "transformer"]),
    (lambda d: d["transformer"].update(num_heads=0), ["num_heads", ">= 1"]),
    (lambda d: d["transformer"].update(num_heads=15), ["must equal hidden_size"]),
    (lambda d: d["transformer"]["blocks"].append({"kind": "conv", "count": 2}), ["'conv'", "must be one of"]),
    (lambda d: d["vae"].update(params=-5), ["params", "must be > 0"]),
    (lambda d: d.update(uses_cfg="yes"), ["uses_cfg", "true or false"]),
    (lambda d: d["transformer"].update(attention="sparse"), ["'sparse'", "must be one of"]),
    (lambda d: d["transformer"].update(experts=3), ["experts", "1 or 2"]),
    (lambda d: d["transformer"].update(experts=2), ["expert_boundary_ratio", "between 0 and 1"]),
    (lambda d: d["transformer"]["blocks"][0].pop("passes"), ["blocks[0]", "'kernels' and 'passes'", "both or neither"]),
    (lambda d: d["transformer"]["blocks"][0].update(passes=float("nan")), ["blocks[0].passes", "not a finite number"]),
    (lambda d: d["transformer"]["blocks"][0].update(kernels=5000), ["blocks[0].kernels", "<= 2000"]),
])
def test_model_schema_breaks_name_file_key_and_rule(tmp_path, mutate, words):
    data = _model_data()
    mutate(data)
    path = _write(tmp_path, "broken.yaml", data)
    with pytest.raises(DitplanError) as error:
        load_model(str(path))
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_malformed_yaml_and_unknown_ids(tmp_path):
    path = _write(tmp_path, "bad.yaml", "id: [unclosed\n")
    with pytest.raises(DitplanError, match="malformed YAML"):
        load_model(str(path))
    with pytest.raises(DitplanError, match="unknown model 'flux-pro'.*pixart-alpha"):
        load_model("flux-pro")
    with pytest.raises(DitplanError, match="unknown cluster 'dgx-9'.*l40-pcie-8"):
        load_cluster("dgx-9")


def _cluster_data() -> dict:
    return yaml.safe_load((CLUSTERS_DIR / "l40-pcie-8.yaml").read_text())


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(racks=2), ["unknown key 'racks'"]),
    (lambda d: d["node"]["links"]["pcie"].pop("latency_us"), ["missing field 'latency_us'", "node.links.pcie"]),
    (lambda d: d["node"]["links"]["socket"].update(bandwidth_gbs=0), ["socket.bandwidth_gbs", "must be > 0"]),
    (lambda d: d["node"]["links"]["pcie"].update(bandwidth_gbs=-32), ["pcie.bandwidth_gbs", "must be > 0"]),
    (lambda d: d["node"]["links"].pop("socket"), ["missing field 'socket'", "2 CPU sockets"]),
    (lambda d: d["node"]["links"]["pcie"].update(efficiency=1.5), ["efficiency", "<= 1.0"]),
    (lambda d: d.update(hardware="b300"), ["unknown hardware 'b300'"]),
])
def test_cluster_schema_breaks_name_file_key_and_rule(tmp_path, mutate, words):
    data = _cluster_data()
    mutate(data)
    path = _write(tmp_path, "broken-cluster.yaml", data)
    with pytest.raises(DitplanError) as error:
        load_cluster(str(path))
    for word in words:
        assert word in str(error.value)
    if "hardware" not in words[0]:
        assert str(path) in str(error.value)


def test_nodes_replicate_the_node_over_the_network():
    one = load_cluster("h100-sxm-nvlink-8")
    many = load_cluster("h100-sxm-nvlink-8", nodes=128)
    assert (one.gpus, many.gpus, many.nodes) == (8, 1024, 128)
    assert many.graph().number_of_nodes() == 128 * one.node_graph.number_of_nodes() + 1
    assert many.tier_between(0, 7) == "nvlink" and many.tier_between(7, 8) == "network"
    with pytest.raises(DitplanError, match="has 8 GPUs"):
        load_cluster("h100-sxm-nvlink-8", gpus=16)
    with pytest.raises(DitplanError, match="--nodes 0"):
        load_cluster("l40-pcie-8", nodes=0)


def test_cluster_accepts_a_yaml_path():
    path = CLUSTERS_DIR / "t4-pcie-4.yaml"
    assert load_cluster(str(path), gpus=2).gpus == 2


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(tdp_w=300), "unknown key 'tdp_w'"),
    (lambda d: d.pop("sm_count"), "missing field 'sm_count'"),
    (lambda d: d.update(memory_bandwidth_gbs=0), "memory_bandwidth_gbs: 0.0 is not allowed; it must be > 0"),
    (lambda d: d.update(matmul_efficiency=1.2), "matmul_efficiency: 1.2 is not allowed; it must be <= 1.0"),
])
def test_hardware_schema_breaks_name_file_key_and_rule(tmp_path, mutate, words):
    from costmodel.topology import HARDWARE_DIR, _load_hardware_file

    data = yaml.safe_load((HARDWARE_DIR / "l40.yaml").read_text())
    mutate(data)
    path = _write(tmp_path, "gpu.yaml", data)
    with pytest.raises(DitplanError) as error:
        _load_hardware_file(str(path))
    assert words in str(error.value) and str(path) in str(error.value)
