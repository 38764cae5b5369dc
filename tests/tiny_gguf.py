"""A tiny random Llama as a GGUF file, with the bundled model's tokenizer (its 49k-token vocabulary,
merges, special tokens and chat template) and one tensor in each block format tensorjet dequantizes
itself (`FORMATS`), or its projections in 4-bit blocks (`BLOCK_FORMATS`): converting and starting it
take a fraction of a second, where the bundled model takes seconds."""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from tensorjet.models.gguf_reader import GGUFFile

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 96
# The format of each tensor kind (2D weights; the norms are F32).
FORMATS = {
    "token_embd": GGMLQuantizationType.Q8_0,
    "attn_q": GGMLQuantizationType.Q4_1,
    "attn_k": GGMLQuantizationType.Q4_0,
    "attn_v": GGMLQuantizationType.Q8_0,
    "attn_output": GGMLQuantizationType.F16,
    "ffn_gate": GGMLQuantizationType.BF16,
    "ffn_up": GGMLQuantizationType.Q4_1,
    "ffn_down": GGMLQuantizationType.F32,
}
# Every decoder projection in 4-bit blocks, as llama.cpp's Q4_0/Q4_1 files are: one that runs its
# blocks on the CPU (`quantization="gguf"`, the default there for such a file).
BLOCK_FORMATS = {
    "token_embd": GGMLQuantizationType.Q8_0,
    "attn_q": GGMLQuantizationType.Q4_1,
    "attn_k": GGMLQuantizationType.Q4_0,
    "attn_v": GGMLQuantizationType.Q4_1,
    "attn_output": GGMLQuantizationType.Q4_0,
    "ffn_gate": GGMLQuantizationType.Q4_1,
    "ffn_up": GGMLQuantizationType.Q4_1,
    "ffn_down": GGMLQuantizationType.Q4_0,
}


def write_tiny_gguf(path: Path, bundled: Path, seed: int = 0, formats: dict = FORMATS) -> Path:
    tokenizer = GGUFFile.open(bundled).metadata
    vocab = len(tokenizer["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny random llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tokenizer["tokenizer.ggml.pre"])
    writer.add_token_list(tokenizer["tokenizer.ggml.tokens"])
    writer.add_token_types(tokenizer["tokenizer.ggml.token_type"])
    writer.add_token_merges(tokenizer["tokenizer.ggml.merges"])
    writer.add_bos_token_id(tokenizer["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tokenizer["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(tokenizer["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(tokenizer["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(tokenizer["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(tokenizer["tokenizer.chat_template"])

    def weight(name: str, kind: str, rows: int, cols: int) -> None:
        values = (rng.standard_normal((rows, cols)) * cols**-0.5).astype(np.float32)
        qtype = formats[kind]
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    head_dim = HIDDEN // HEADS
    weight("token_embd.weight", "token_embd", vocab, HIDDEN)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", "attn_q", HIDDEN, HIDDEN)
        weight(f"blk.{i}.attn_k.weight", "attn_k", KV_HEADS * head_dim, HIDDEN)
        weight(f"blk.{i}.attn_v.weight", "attn_v", KV_HEADS * head_dim, HIDDEN)
        weight(f"blk.{i}.attn_output.weight", "attn_output", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", "ffn_gate", FFN, HIDDEN)
        weight(f"blk.{i}.ffn_up.weight", "ffn_up", FFN, HIDDEN)
        weight(f"blk.{i}.ffn_down.weight", "ffn_down", HIDDEN, FFN)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
