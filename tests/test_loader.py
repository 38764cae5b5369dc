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
