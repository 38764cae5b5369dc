"""Model sources: the bundled GGUF equals HF's own GGUF load; HF directories (sharded) round-trip;
dummy presets have the real shapes; missing models fail with a message naming them."""

import pytest
import torch
import transformers

from tensorjet.models.loader import iter_weights, resolve_model


def test_gguf_weights_equal_transformers_gguf_load(hf_model):
    source = resolve_model(None)
    assert source.kind == "gguf"
    ours = dict(iter_weights(source))
    reference = hf_model.state_dict()
    assert set(ours) <= set(reference) and "model.layers.0.self_attn.q_proj.weight" in ours
    for name, tensor in ours.items():
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name].float()), name


def test_sharded_hf_directory_round_trips(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    source = resolve_model(str(tmp_path))
    assert source.kind == "hf" and source.hf_config.model_type == "qwen2"
    ours = dict(iter_weights(source))
    for name, tensor in model.state_dict().items():
        if name in ours:
            assert torch.equal(ours[name], tensor), name
    assert "model.layers.1.self_attn.q_proj.bias" in ours


@pytest.mark.parametrize(
    "name, billions",
    [
        ("meta-llama/Meta-Llama-3-8B", 8.03),
        ("meta-llama/Llama-3.2-1B", 1.24),
        ("Llama-3-70B", 70.6),
        ("meta-llama/Llama-3.1-405B", 405.8),
        ("Qwen/Qwen2-7B", 7.62),
        ("qwen2-72b", 72.7),
    ],
)
def test_dummy_presets_have_real_parameter_counts(name, billions):
    config = resolve_model(name, load_format="dummy").hf_config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert abs(count - billions) / billions < 0.01


def test_missing_models_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model("someorg/some-model-that-is-not-cached")
    with pytest.raises(ValueError, match="presets"):
        resolve_model("not-a-preset", load_format="dummy")
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(None, load_format="tensorrt")


def _tiny_llama_and_checkpoint(tie: bool = False):
    from tensorjet.models.llama import LlamaForCausalLM

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    checkpoint = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    return LlamaForCausalLM(config), checkpoint


@pytest.mark.parametrize("tie", [False, True])
def test_load_weights_routes_each_tensor_through_its_parameters_loader(tie):
    model, checkpoint = _tiny_llama_and_checkpoint(tie)
    qkv = model.layers[1].self_attn.qkv_proj.weight
    routed = []
    default = qkv.weight_loader

    def recording_loader(param, tensor, shard_id):
        routed.append(shard_id)
        default(param, tensor, shard_id)

    qkv.weight_loader = recording_loader
    model.load_weights(checkpoint.items())
    assert routed == [0, 1, 2], "q, k and v each reach the merged weight's loader with their shard id"
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    expected_qkv = torch.cat([checkpoint[f"{attn}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected_qkv)
    gate_up = torch.cat([checkpoint[f"{mlp}.gate_proj.weight"], checkpoint[f"{mlp}.up_proj.weight"]])
    assert torch.equal(model.layers[1].mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(model.layers[1].mlp.down_proj.weight, checkpoint[f"{mlp}.down_proj.weight"])
    assert torch.equal(model.embed_tokens.weight, checkpoint["model.embed_tokens.weight"])
    head = checkpoint["model.embed_tokens.weight" if tie else "lm_head.weight"]
    assert torch.equal(model.lm_head.weight, head)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie


def test_load_weights_names_unknown_misshapen_and_missing_tensors():
    model, checkpoint = _tiny_llama_and_checkpoint()
    extra = dict(checkpoint) | {"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(
        ValueError, match=r"'layers.0.mlp.extra_proj.weight' does not belong to a llama model"
    ):
        model.load_weights(extra.items())

    k = "model.layers.0.self_attn.k_proj.weight"
    misshapen = dict(checkpoint) | {k: checkpoint[k][:-1]}
    with pytest.raises(
        ValueError, match=r"'layers.0.self_attn.k_proj.weight' has shape \(15, 32\), expected \(16, 32\)"
    ):
        model.load_weights(misshapen.items())

    norm = "model.norm.weight"
    misshapen = dict(checkpoint) | {norm: torch.ones(31)}
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \(31,\), expected \(32,\)"):
        model.load_weights(misshapen.items())

    missing = {n: t for n, t in checkpoint.items() if n != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing 1 tensors, e.g. \['layers.1.mlp.up_proj.weight'\]"):
        model.load_weights(missing.items())
