"""Steps whose sequences have any number of query rows over their cached contexts.

A decode has one query row, a prompt chunk or a run of draft tokens to verify has several, over
whatever the cache already holds. One step mixes them; both attention backends must give every row
plain causal attention over its sequence's keys (position p sees positions <= p), eagerly and when the
step replays from CUDA-graph buffers. Without a GPU the graph paths run their static buffers eagerly
(as `tensorjet.runtime.cuda_graph` does), with the Triton kernels under the interpreter; on a GPU the
same tests capture and replay real graphs.

Unused cache slots hold NaN, so a key read from a wrong slot, or an output row left unwritten, shows.
"""

import os

import pytest
import torch
import transformers
from numerics import cdiv, rel_err

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tensorjet.layers.attention import AttentionMetadata, StepShape, TorchAttentionBackend  # noqa: E402
from tensorjet.layers.step_layout import Layout  # noqa: E402
from tensorjet.layers.triton_attention import TritonAttentionBackend  # noqa: E402
from tensorjet.models.llama import LlamaForCausalLM  # noqa: E402
from tensorjet.runtime.cuda_graph import MixedStepGraphs  # noqa: E402
from tensorjet.runtime.device_io import StepUpload  # noqa: E402
from tensorjet.runtime.step_values import StepValues  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK, HK, GROUP, D = 8, 2, 2, 32
SCALE = D**-0.5
MAX_CONTEXT = 96
NAN = float("nan")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (query rows, context length) per sequence: decodes, drafts to verify (4 and 6 rows) over cached
# contexts of different lengths, a fresh prompt, and a short prompt chunk over a cached prefix.
MIXED_STEP = [(1, 37), (4, 29), (6, 50), (1, 3), (9, 9), (4, 17)]
# Another step over other sequences of the same cache: a CUDA graph captured on one replays the other.
OTHER_STEP = [(6, 21), (1, 44), (1, 8), (4, 4), (4, 40)]
# Verify steps: up to 5 drafts (6 rows) per sequence, some sequences without any.
VERIFY_STEP = [(1, 37), (4, 29), (6, 50), (1, 3), (6, 6), (2, 17)]
OTHER_VERIFY_STEP = [(6, 21), (1, 44), (3, 8), (4, 4), (5, 40)]


class PagedSteps:
    """One paged KV cache holding the sequences of several steps (blocks scattered at random; every
    slot outside a context holds NaN), and each step's metadata."""

    def __init__(self, steps: list[list[tuple[int, int]]], dtype: torch.dtype, num_layers: int = 1) -> None:
        contexts = [c for step in steps for _, c in step]
        need = [cdiv(c, BLOCK) for c in contexts]
        num_blocks = sum(need) + 2
        perm = torch.randperm(num_blocks).tolist()
        shape = (2, num_layers, num_blocks, BLOCK, HK, D)
        self.kv = torch.full(shape, NAN, dtype=dtype, device=DEVICE)
        self.tables: list[list[int]] = []
        for c, n in zip(contexts, need):
            table, perm = perm[:n], perm[n:]
            self.tables.append(table)
            slots = self.slots(table, 0, c)
            self.kv.view(2, num_layers, -1, HK, D)[:, :, slots] = torch.randn(
                2, num_layers, c, HK, D, device=DEVICE
            ).to(dtype)
        self.steps = steps
        self.first_seq = [sum(len(s) for s in steps[:i]) for i in range(len(steps))]

    @staticmethod
    def slots(table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(table, dtype=torch.long)[pos // BLOCK] * BLOCK + pos % BLOCK

    def metadata(self, i: int) -> AttentionMetadata:
        """Step i's metadata, built as the runner builds it."""
        step = self.steps[i]
        tables = self.tables[self.first_seq[i] : self.first_seq[i] + len(step)]
        width = max(len(t) for t in tables)
        padded = [t + [-1] * (width - len(t)) for t in tables]
        slots = torch.cat([self.slots(t, c - n, c) for t, (n, c) in zip(tables, step)])
        return AttentionMetadata(
            query_lens=[n for n, _ in step],
            context_lens=[c for _, c in step],
            slot_mapping=slots.to(DEVICE),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=DEVICE),
            block_size=BLOCK,
        )

    def new_kv(self, meta: AttentionMetadata, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's new keys and values, as they sit in the cache."""
        k, v = self.kv[:, layer].reshape(2, -1, HK, D)[:, meta.slot_mapping]
        return k, v


def dense_reference(q: torch.Tensor, cache: PagedSteps, meta: AttentionMetadata, layer: int = 0):
    """Per sequence: gather its keys/values through its block table, then dense causal attention of its
    query rows (the last of its context) over them, in float64."""
    k_flat, v_flat = (cache.kv[i, layer].reshape(-1, HK, D) for i in (0, 1))
    out, row = [], 0
    for i, (n, total) in enumerate(zip(meta.query_lens, meta.context_lens)):
        slots = cache.slots(meta.block_tables[i].tolist(), 0, total)
        k = k_flat[slots].double().repeat_interleave(GROUP, dim=1)  # [total, Hq, D]
        v = v_flat[slots].double().repeat_interleave(GROUP, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + n].double(), k) * SCALE
        q_pos = torch.arange(total - n, total, device=q.device)
        k_pos = torch.arange(total, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        row += n
    return torch.cat(out)


def per_sequence_errors(out: torch.Tensor, ref: torch.Tensor, query_lens: list[int]) -> list[float]:
    rows = torch.tensor(query_lens).cumsum(0).tolist()
    return [rel_err(out[end - n : end], ref[end - n : end]) for n, end in zip(query_lens, rows)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_mixed_query_rows_match_dense_causal_attention(backend_name, dtype, seed):
    cache = PagedSteps([MIXED_STEP], dtype)
    meta = cache.metadata(0)
    k_cache, v_cache = cache.kv[0, 0], cache.kv[1, 0]
    backend = TorchAttentionBackend() if backend_name == "torch" else TritonAttentionBackend()
    num_rows = sum(meta.query_lens)
    q = torch.randn(num_rows, HK * GROUP, D, device=DEVICE).to(dtype)
    k_new, v_new = cache.new_kv(meta)
    out = backend.forward(q, k_cache, v_cache, backend.prepare(meta), SCALE, k_new=k_new, v_new=v_new)
    assert not out.isnan().any(), f"NaN in the output: a wrong slot read or a row left unwritten, seed={seed}"
    errors = per_sequence_errors(out, dense_reference(q, cache, meta), meta.query_lens)
    assert max(errors) < TOL[dtype], f"(query rows, context) {MIXED_STEP}: errors {errors}, seed={seed}"


class GraphInputs:
    """A backend's graph buffers used as a graph family uses them (`StepGraphs.upload`): for each shape
    its parts at the start of one input buffer, written by one upload, and the step's block tables
    loaded into the backend's static ones."""

    def __init__(self, buffers) -> None:
        self.buffers = buffers
        self.buffer = torch.zeros(1 << 14, dtype=torch.uint8, device=DEVICE)
        self.upload = StepUpload(DEVICE)

    def state(self, shape: StepShape):
        return self.buffers.state(shape, Layout(self.buffers.parts(shape)).views(self.buffer))

    def fill(self, meta: AttentionMetadata, shape: StepShape) -> None:
        values, order, num_decoding = self.buffers.host_values(meta.query_lens, meta.context_lens, shape)
        self.upload([Layout(self.buffers.parts(shape))], values, out=self.buffer)
        self.buffers.load_block_tables(meta.block_tables[order], num_decoding)


def _replayer(run):
    """`run()` captured in a CUDA graph (after a warm-up that compiles its kernels), returning a
    function that replays it; without a GPU, a function that runs it eagerly."""
    if DEVICE.type != "cuda":
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()

    def replay():
        graph.replay()
        return captured

    return replay


# Graph families: (steps, the capacity, a smaller shape, the most rows a sequence decodes with). A
# mixed-step shape (`MixedStepGraphs`) sends multi-row sequences to the extend kernel; a verify shape
# (`VerifyGraphs`: a few rows each) runs every sequence through the decode kernel.
GRAPH_FAMILIES = {
    "mixed": ([OTHER_STEP, MIXED_STEP], StepShape(41, 8, 4, 40), StepShape(33, 8, 4, 32), 1),
    "verify": ([OTHER_VERIFY_STEP, VERIFY_STEP], StepShape(97, 16, 16, 6), StepShape(49, 8, 8, 6), 6),
}


@pytest.mark.parametrize(
    "dtype,family", [(d, f) for d in (torch.float32, torch.bfloat16) for f in GRAPH_FAMILIES]
)
def test_mixed_query_rows_replay_from_graph_buffers(dtype, family, seed):
    """The Triton backend's graph buffers (what `MixedStepGraphs` and `VerifyGraphs` capture) hold a step
    with 1 to 9 query rows per sequence over cached contexts; a graph captured on another step replays it
    exactly as the eager backend runs the same kernels, for a smaller shape (views of the buffers) and the
    full capacity."""
    step_rows, capacity, smaller, max_decode_rows = GRAPH_FAMILIES[family]
    cache = PagedSteps(step_rows, dtype)
    k_cache, v_cache = cache.kv[0, 0], cache.kv[1, 0]
    backend = TritonAttentionBackend()
    buffers = GraphInputs(
        backend.graph_buffers(
            capacity, max_context_len=MAX_CONTEXT, block_size=BLOCK, num_kv_heads=HK, device=DEVICE
        )
    )
    assert (buffers.state(capacity).extend is None) == (family == "verify"), "which kernel a family takes"
    q_static = torch.zeros(capacity.num_rows, HK * GROUP, D, dtype=dtype, device=DEVICE)
    steps = [cache.metadata(i) for i in range(2)]
    queries = [torch.randn(sum(m.query_lens), HK * GROUP, D, device=DEVICE).to(dtype) for m in steps]
    for shape in (smaller, capacity):

        def run(shape=shape):
            state = buffers.state(shape)
            return backend.forward(q_static[: shape.num_rows], k_cache, v_cache, state, SCALE)

        buffers.fill(steps[0], shape)  # the graph is captured on the other step's contents
        q_static[: queries[0].shape[0]].copy_(queries[0])
        replay = _replayer(run)
        for meta, q in zip(reversed(steps), reversed(queries)):
            n = q.shape[0]
            buffers.fill(meta, shape)
            q_static[:n].copy_(q)
            q_static[n:].fill_(NAN)  # padding rows: nothing may read them into an owned row
            out = replay()
            eager_state = backend.prepare(meta, max_decode_rows=max_decode_rows)
            eager = backend.forward(q, k_cache, v_cache, eager_state, SCALE)
            what = f"shape {shape}, step {list(zip(meta.query_lens, meta.context_lens))}, seed={seed}"
            assert not out[:n].isnan().any(), f"NaN in an owned row: {what}"
            errors = per_sequence_errors(out[:n], eager, meta.query_lens)
            assert max(errors) < TOL[dtype] / 10, f"graph vs eager {errors}: {what}"
            errors = per_sequence_errors(out[:n], dense_reference(q, cache, meta), meta.query_lens)
            assert max(errors) < TOL[dtype], f"graph vs dense reference {errors}: {what}"
            assert torch.all(out[n:-1] == 0), f"rows no sequence owns must be zero: {what}"


def test_mixed_step_graph_gives_eager_logits_for_every_query_row(seed):
    """A tiny Llama through `MixedStepGraphs` (captured and replayed on a GPU, its static buffers run
    eagerly on the CPU): a step with 1, 4 and 6 query rows per sequence over cached contexts, every
    row's logits read back (as verifying drafts needs), equals the eager forward."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=HK * GROUP * D,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HK * GROUP,
        num_key_value_heads=HK,
        max_position_embeddings=MAX_CONTEXT,
    )
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config, torch.float32)
    model.init_dummy_weights(seed % 1000)
    cache = PagedSteps([MIXED_STEP], torch.float32, num_layers=config.num_hidden_layers)
    backend = TritonAttentionBackend()
    for i, attn in enumerate(model.attention_layers):
        attn.backend = backend
        attn.k_cache, attn.v_cache = cache.kv[0, i], cache.kv[1, i]
    graphs = MixedStepGraphs(
        model,
        backend,
        max_batch_size=32,
        max_num_tokens=32,
        block_size=BLOCK,
        num_kv_heads=HK,
        max_seq_len=MAX_CONTEXT,
        device=DEVICE,
    )
    graphs.capture_all()
    assert len(graphs.graphs) == (1 if DEVICE.type == "cuda" else 0)

    meta = cache.metadata(0)
    num_rows = sum(meta.query_lens)
    ids = torch.randint(0, config.vocab_size, (num_rows,), device=DEVICE)
    positions = torch.cat([torch.arange(c - n, c) for n, c in MIXED_STEP]).to(DEVICE)
    every_row = torch.arange(num_rows, device=DEVICE)
    values = StepValues(
        query_lens=meta.query_lens,
        context_lens=meta.context_lens,
        block_tables=cache.tables[: len(MIXED_STEP)],
        input_ids=ids.tolist(),
        positions=positions.tolist(),
        slots=meta.slot_mapping.tolist(),
        logits_indices=every_row.tolist(),
        fill_rows=[],
        fill_from=[],
        draft_rows=[],
        draft_entries=[],
    )
    size = graphs.size_for(values)
    assert size is not None, "the step fits a mixed-step graph"
    with torch.inference_mode():
        # Both runs write the step's keys/values into the same slots, so they see the same cache.
        eager = model.compute_logits(model(ids, positions, cache.metadata(0))[every_row])
        graphs.upload(size, values, StepUpload(DEVICE))
        replayed = graphs.replay(size, num_rows).clone()
    assert not replayed.isnan().any(), f"NaN in the replayed logits, seed={seed}"
    errors = per_sequence_errors(replayed, eager, meta.query_lens)
    assert max(errors) < 1e-5, f"(query rows, context) {MIXED_STEP}: graph vs eager {errors}, seed={seed}"
