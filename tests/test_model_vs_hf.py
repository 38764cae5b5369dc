"""Acceptance 1: our Llama-family model gives HF transformers' logits (fp32, max abs diff < 1e-4) on a
ragged batch that mixes a cached prefix (extend), a fresh prompt, and a decode step."""

import pytest
import torch
import transformers

from tensorjet.layers.attention import AttentionMetadata
from tensorjet.models.llama import LlamaForCausalLM

BLOCK = 4
COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    ),
    "llama_tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
}


class PagedRun:
    """Drives our model over a hand-built paged KV cache, step by step."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 64) -> None:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model = model
        self.cache = torch.full(
            (2, cfg.num_hidden_layers, num_blocks, BLOCK, cfg.num_key_value_heads, head_dim), float("nan")
        )  # poisoned: reading an unwritten slot shows up as NaN
        for i, attn in enumerate(model.attention_layers):
            attn.k_cache, attn.v_cache = self.cache[0, i], self.cache[1, i]
        # Scatter blocks so sequences are not contiguous in the pool.
        self.free = list(torch.randperm(num_blocks).tolist())
        self.tables: dict[int, list[int]] = {}

    def step(self, seqs: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """seqs: (seq id, all its tokens, how many are already cached). Returns logits of every new token."""
        ids, pos, slots, qlens, clens, tables = [], [], [], [], [], []
        for sid, tokens, cached in seqs:
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < len(tokens):
                table.append(self.free.pop())
            ids += tokens[cached:]
            pos += range(cached, len(tokens))
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, len(tokens))]
            qlens.append(len(tokens) - cached)
            clens.append(len(tokens))
            tables.append(table)
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            query_lens=qlens,
            context_lens=clens,
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
            block_size=BLOCK,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), meta)
            return self.model.compute_logits(hidden)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_hf_on_ragged_batch_with_cached_prefix(family):
    torch.manual_seed(0)
    config = FAMILIES[family]()
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF inits some weights (norms) to constants; randomise so they matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    ours = LlamaForCausalLM(config, torch.float32)
    ours.load_weights(hf.state_dict().items())
    run = PagedRun(ours)

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, config.vocab_size, (23,), generator=g).tolist()  # prefix cached in step 1
    b = torch.randint(0, config.vocab_size, (9,), generator=g).tolist()  # fresh prompt in step 2
    c = torch.randint(0, config.vocab_size, (12,), generator=g).tolist()  # decodes in step 2
    run.step([(0, a[:13], 0), (2, c[:11], 0)])
    logits = run.step([(0, a, 13), (1, b, 0), (2, c, 11)])

    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0] for s in (a, b, c)]
    expected = torch.cat([ref[0][13:], ref[1], ref[2][11:]])
    assert logits.shape == expected.shape
    assert not torch.isnan(logits).any()
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_buffer_is_built_on_the_device_in_use(family):
    """The runner builds the model inside `with torch.device(...)`; a table made elsewhere (a scaled
    rope's frequencies on the CPU, say) would break the build on a GPU. The meta device shows it here."""
    with torch.device("meta"):
        model = LlamaForCausalLM(FAMILIES[family](), torch.float32)
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}
