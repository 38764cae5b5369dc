"""Tensor parallelism on the CPU (gloo).

Fast: how dimensions split, which sizes are refused, and that every weight format loads each rank's
share of a checkpoint (the ranks' shares put together give the whole layer, each rank holds 1/N of it
plus what is replicated) without starting a process. Slow (they start processes): the bundled model at
tensor_parallel_size 3 and a small random Llama at 2 and 4 give HF transformers' greedy tokens, alone and
batched, through `LLM` and through `serve` with the openai client, and a grammar holds its requests to a
choice beside free ones; speculative decoding (n-gram and a draft model) at 2 agrees with one process; a
killed worker makes `/health` fail and its pending requests end with 503 within 10 s; two torchrun
"nodes" on 127.0.0.1 serve a request.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
import transformers
from greedy import TOP_LOGPROBS, GreedyRun, assert_all_agree, hf_greedy
from prompts import PLAIN
from serving import running_server
from test_speculative import SPECULATION, copy_heavy_prompts, save_llama, spec_options

from tensorjet import LLM, SamplingParams
from tensorjet.config import EngineConfig, FeatureNotAvailableError
from tensorjet.distributed import Slice, TensorParallel, split
from tensorjet.kernels.int4_reference import dequantize
from tensorjet.layers.linear import ColumnParallel, Linear
from tensorjet.models.llama import LlamaForCausalLM, check_tensor_parallel
from tensorjet.models.loader import iter_weights, load_tokenizer, resolve_model
from tensorjet.quant.formats import quantization_spec
from tensorjet.quant.fp8 import Fp8LinearMethod
from tensorjet.quant.int4 import Int4LinearMethod
from tensorjet.runtime import parallel
from tensorjet.runtime.kernel_selection import linear_method_for
from tensorjet.runtime.worker_group import HEARTBEAT_TIMEOUT, WorkerGroup, heartbeat_key
from tensorjet.sampling_params import StructuredOutput
from tensorjet.serve.app import build_app
from tensorjet.serve.options import ServerOptions

DATA = Path(__file__).parent / "data" / "quantized"


# ---- how a dimension splits -------------------------------------------------------------------------
def test_heads_split_evenly_replicate_when_ranks_outnumber_them_and_a_vocabulary_pads():
    ranks = [TensorParallel(r, 4) for r in range(4)]
    assert [split(8 * 16, tp, "q", unit=16) for tp in ranks] == [Slice(32 * r, 32, 32) for r in range(4)]
    kv = [split(2 * 16, tp, "kv", unit=16, replicate=True) for tp in ranks]
    assert [s.start for s in kv] == [0, 0, 16, 16] and {s.size for s in kv} == {16}  # head r * 2 // 4
    vocab = [split(10, tp, "vocabulary", pad=True) for tp in ranks]
    assert vocab == [Slice(0, 3, 3), Slice(3, 3, 3), Slice(6, 3, 3), Slice(9, 3, 1)]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 must divide the rows \(6\)"):
        split(6, ranks[1], "rows")
    with pytest.raises(ValueError, match="must divide or be a multiple of the kv heads"):
        split(3 * 16, ranks[0], "kv heads", unit=16, replicate=True)


def test_sizes_that_do_not_split_the_model_are_refused_by_name(tiny_model_dir):
    smollm2 = transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )
    check_tensor_parallel(smollm2, 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide num_attention_heads \(9\)"):
        check_tensor_parallel(smollm2, 2)
    gqa = transformers.LlamaConfig(
        hidden_size=96, num_attention_heads=12, num_key_value_heads=8, intermediate_size=96
    )
    check_tensor_parallel(gqa, 4)
    with pytest.raises(ValueError, match=r"must divide num_key_value_heads \(8\) or be a multiple of it"):
        check_tensor_parallel(gqa, 6)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide num_attention_heads \(4\)"):
        LLM(model=tiny_model_dir, device="cpu", tensor_parallel_size=3)  # refused before any process starts


def test_more_ranks_than_visible_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = EngineConfig.from_options(device="cuda", tensor_parallel_size=4)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=4 needs 4 GPUs \(one per rank\); 2 are visible"
    ):
        parallel._check_devices(config, 4, None)
    with pytest.raises(ValueError, match="names one GPU"):
        EngineConfig.from_options(device="cuda:1", tensor_parallel_size=2)


# ---- loading each rank's share ------------------------------------------------------------------------
def _models(path: Path, size: int) -> tuple[LlamaForCausalLM, list[LlamaForCausalLM]]:
    """The whole model, and each of `size` ranks' share, loaded from the checkpoint at `path` (no process
    group: loading communicates nothing)."""
    config = EngineConfig.from_options(model=str(path), device="cpu", dtype="float32")
    source = resolve_model(str(path))
    spec = quantization_spec(config.quantization, source.quantization_config)
    models = []
    for tp in [TensorParallel(), *(TensorParallel(r, size) for r in range(size))]:
        model = LlamaForCausalLM(
            source.hf_config,
            torch.float32,
            linear_method_for(config, spec),
            kv_cache_scales=spec is not None and spec.kv_cache_scales,
            tp=tp,
        )
        model.load_weights(iter_weights(source))
        models.append(model)
    return models[0], models[1:]


def _float_weight(layer: Linear) -> torch.Tensor:
    """The layer's weight as the products use it, whatever its format."""
    if isinstance(layer.method, Int4LinearMethod):
        return dequantize(layer.method.weight, torch.float32)
    if isinstance(layer.method, Fp8LinearMethod):
        return layer.weight.float() * layer.weight_scale[:, None]
    return layer.weight


def _assemble(whole: Linear, shares: list[Linear]) -> torch.Tensor:
    """The ranks' weights put back in place (replicated rows must agree)."""
    out = torch.full_like(_float_weight(whole), float("nan"))
    for share in shares:
        weight = _float_weight(share)
        if isinstance(share.parallel, ColumnParallel):
            for block, part in enumerate(share.output_slices):
                target = out[whole.shard_rows(block)][part.start : part.start + part.valid]
                rows = weight[share.shard_rows(block)][: part.valid]
                assert target.isnan().all() or torch.equal(target, rows), "replicated rows differ"
                target.copy_(rows)
        else:
            out[:, share.input_slice.start : share.input_slice.start + share.input_slice.size] = weight
    return out


def _weight_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize(
    "name, size",
    [
        ("llama-tiny", 2),
        ("llama-tiny", 4),  # 2 key/value heads on 4 ranks: each held twice
        ("llama-tiny-fp8-static", 2),
        ("llama-tiny-modelopt-fp8", 2),
        ("llama-tiny-gptq", 2),
        ("llama-tiny-awq-gemm", 2),
        ("llama-tiny-w4a16-awq", 2),  # compressed-tensors, asymmetric
    ],
)
def test_every_format_loads_each_ranks_share_of_the_checkpoint(name, size):
    whole, shares = _models(DATA / name, size)
    linears = [n for n, m in whole.named_modules() if isinstance(m, Linear)]
    for layer_name in linears:
        parts = [share.get_submodule(layer_name) for share in shares]
        assert torch.equal(
            _assemble(whole.get_submodule(layer_name), parts), _float_weight(whole.get_submodule(layer_name))
        ), layer_name
    embeddings = torch.cat([share.embed_tokens.weight for share in shares])
    assert torch.equal(embeddings[: whole.config.vocab_size], whole.embed_tokens.weight)
    # Each rank holds 1/N of each weight, except what every rank needs whole (norms, per-tensor scales, a
    # row-parallel layer's per-channel scales) and the key/value heads it shares with other ranks.
    whole_params = whole.state_dict()
    config = whole.config
    kv_rows = config.num_key_value_heads * config.head_dim
    extra_kv = (
        2 * config.num_hidden_layers * max(0, config.head_dim - kv_rows // size) * config.hidden_size * 4
    )
    for share in shares:
        expected = extra_kv
        for param_name, tensor in share.state_dict().items():
            full = whole_params[param_name]
            if tensor.shape == full.shape:
                assert "norm" in param_name or full.numel() == 1 or _row_parallel_scale(param_name), (
                    param_name
                )
                expected += _weight_bytes({param_name: full})
            else:
                expected += _weight_bytes({param_name: full}) // size
        assert _weight_bytes(share.state_dict()) == expected


def _row_parallel_scale(name: str) -> bool:
    return name.endswith(("o_proj.weight_scale", "down_proj.weight_scale"))


def test_int4_groups_must_not_straddle_ranks_and_act_order_may_not_cross_them():
    with pytest.raises(ValueError, match="cannot be split over 4 tensor-parallel ranks"):
        _models(DATA / "llama-tiny-gptq", 4)  # o_proj: 16 input columns per rank, groups of 32
    with pytest.raises(FeatureNotAvailableError, match="INT4 act order"):
        _models(DATA / "llama-tiny-gptq-act-order", 2)


# ---- the worker watchdog ------------------------------------------------------------------------------
class _Store:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> int:
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def check(self, keys: list[str]) -> bool:
        return False


def test_a_torchrun_worker_whose_heartbeat_stops_is_reported_gone(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    store = _Store()
    workers = WorkerGroup(store, size=3)
    for _ in range(10):  # both beat, once a second
        store.add(heartbeat_key(1), 1)
        store.add(heartbeat_key(2), 1)
        assert workers.failure() is None
        now[0] += 1.0
    for _ in range(int(HEARTBEAT_TIMEOUT)):  # rank 2 falls silent
        store.add(heartbeat_key(1), 1)
        assert workers.failure() is None
        now[0] += 1.0
    store.add(heartbeat_key(1), 1)
    assert workers.failure() == f"tensor-parallel worker 2 sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f} s"


# ---- the engine over several processes (slow: each test starts them) ----------------------------------
NEW_TOKENS = 8
CHOICES = ("yes", "no", "maybe")
SERVED = ServerOptions(served_model_name="tp")
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP_LOGPROBS)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))  # the bundled model's, through the conversion cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A small random Llama with the bundled tokenizer (so it can be served): GQA 4/2, biases on every
    projection (a row-parallel bias must be added once), an untied LM head with logits spread wide enough
    that greedy choices are not near-ties."""
    path = tmp_path_factory.mktemp("tiny-tp")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PLAIN[:count]]


def _agrees_with_hf(llm: LLM, hf_model, prompts: list[list[int]], eos: int) -> list[str]:
    """Greedy tokens alone and in one batch, each tie-aware equal to HF's; the texts alone."""
    reference = [hf_greedy(hf_model, ids, NEW_TOKENS, eos) for ids in prompts]
    alone = [llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0] for ids in prompts]
    assert_all_agree([GreedyRun.of(c) for c in alone], reference, what="alone vs HF")
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_all_agree([GreedyRun.of(o.outputs[0]) for o in batched], reference, what="batched vs HF")
    return [c.text for c in alone]


def _served_agree(llm: LLM, prompts: list[list[int]], texts: list[str]) -> None:
    """Through `serve` and the openai client: one prompt alone, then all of them in one request."""
    with running_server(build_app(llm, SERVED)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        one = client.completions.create(model="tp", prompt=prompts[0], max_tokens=NEW_TOKENS, temperature=0)
        assert one.choices[0].text == texts[0]
        many = client.completions.create(model="tp", prompt=prompts, max_tokens=NEW_TOKENS, temperature=0)
        assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == texts


def _constrained_beside_free(llm: LLM, prompts: list[list[int]], texts: list[str]) -> None:
    """Half the prompts held to a choice by the grammar's token bitmask (applied on rank 0, the one that
    samples), in one batch with the other half, whose greedy texts stay what they are alone."""
    half = len(prompts) // 2
    constrained = SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, structured_output=StructuredOutput("choice", CHOICES)
    )
    free = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    outs = llm.generate(prompts, [constrained] * half + [free] * (len(prompts) - half), use_tqdm=False)
    assert all(o.outputs[0].text in CHOICES for o in outs[:half]), [o.outputs[0].text for o in outs]
    assert [o.outputs[0].text for o in outs[half:]] == texts[half:]


@pytest.mark.slow  # starts 1 or 3 worker processes
@pytest.mark.parametrize("size, overlap", [(2, False), (4, True)])
def test_a_small_llama_over_2_and_4_ranks_matches_hf_through_llm_and_serve(
    size, overlap, tiny_dir, tokenizer
):
    """At 4 ranks with overlap scheduling (the GPU default): tokens still on rank 0's device reach the
    other ranks by a broadcast, and a constrained step resolves the step in flight first."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer, 4)
    llm = LLM(
        model=str(tiny_dir),
        device="cpu",
        tensor_parallel_size=size,
        kv_cache_max_tokens=4096,
        disable_overlap_scheduler=not overlap,
    )
    try:
        texts = _agrees_with_hf(llm, hf_model, prompts, tokenizer.eos_token_id)
        _constrained_beside_free(llm, prompts, texts)
        llm.make_kv_cache_resident()  # as `tensorjet serve` does: every rank's pool, then steps go on
        _served_agree(llm, prompts, texts)
        weight_bytes = llm.stats()["weight_bytes"]
    finally:
        llm.shutdown()
    # Rank 0 holds 1/N of the weights; whole: the norms and the o and down biases (added once, after the
    # all-reduce); at size 4 one of the 2 key/value heads, which it shares with another rank.
    whole = _weight_bytes(hf_model.state_dict())
    replicated = 4 * 64 * (2 * 2 + 1) + 4 * 64 * 2 * 2
    kv_heads_held = 2 // size or 1
    extra_kv = 2 * 2 * (kv_heads_held - 2 / size) * 16 * (64 + 1) * 4  # rows of k and v, with their bias
    assert weight_bytes == (whole - replicated) / size + replicated + extra_kv


@pytest.mark.slow  # starts 2 worker processes on the bundled model
def test_the_bundled_model_over_3_ranks_matches_hf_through_llm_and_serve(hf_model, tokenizer):
    llm = LLM(device="cpu", dtype="float32", tensor_parallel_size=3, kv_cache_max_tokens=4096)
    try:
        prompts = _prompts(tokenizer, 2)
        texts = _agrees_with_hf(llm, hf_model, prompts, tokenizer.eos_token_id)
        _served_agree(llm, prompts, texts)
        # 9 query and 3 key/value heads, 1536 MLP rows and the tied 49152-row embedding split 3 ways
        whole = sum(t.numel() * 4 for t in hf_model.state_dict().values()) - 49152 * 576 * 4  # tied head
        norms = 4 * 576 * (2 * 30 + 1)
        assert llm.stats()["weight_bytes"] == (whole - norms) // 3 + norms
    finally:
        llm.shutdown()


@pytest.mark.slow  # starts a worker process for each method
@pytest.mark.parametrize(
    "method, graphs", [(method, False) for method in SPECULATION] + [("draft_is_target", True)]
)
def test_speculation_over_2_ranks_agrees_with_one_process(method, graphs, tmp_path):
    """Verify steps under tensor parallelism: n-gram drafts travel in the step's values, a draft model's
    (run whole on rank 0) reach the other rank by the input-id broadcast, and rank 0 alone verifies.
    With graphs (the Triton backend; on the CPU their static buffers run eagerly) every rank uploads the
    step into the same graph's buffer, and the broadcast draft tokens land in it."""
    target = save_llama(tmp_path / "target", seed=4, std=0.1)
    prompts = copy_heavy_prompts(4)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=TOP_LOGPROBS)
    plain = LLM(target, device="cpu", kv_cache_max_tokens=4096)
    try:
        reference = [GreedyRun.of(o.outputs[0]) for o in plain.generate(prompts, params, use_tqdm=False)]
    finally:
        plain.shutdown()
    llm = LLM(
        target,
        device="cpu",
        tensor_parallel_size=2,
        kv_cache_max_tokens=4096,
        speculative_disable_by_acceptance_rate=0,
        **spec_options(method, {"target": target}),
        **(dict(attention_backend="triton", enable_cuda_graph=True) if graphs else {}),
    )
    try:
        alone = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0]
        batched = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
    finally:
        llm.shutdown()
    assert_all_agree([GreedyRun.of(alone)], reference[:1], what="alone vs one process")
    assert_all_agree([GreedyRun.of(o.outputs[0]) for o in batched], reference, what="batched vs one process")
    assert stats["speculative_verify_steps"] > 0 and stats["speculative_accepted_tokens"] > 0
    assert (stats["num_verify_graph_steps"] > 0) == graphs


@pytest.mark.slow  # starts a worker process
def test_an_engine_that_fails_to_start_stops_its_workers(tmp_path):
    """The draft model is refused after the workers loaded their shares and wait to start their caches:
    they are told to stop, and the process can start another tensor-parallel engine."""
    target = save_llama(tmp_path / "target", seed=4)
    draft = save_llama(tmp_path / "draft", seed=5, vocab=96)
    with pytest.raises(ValueError, match="speculative_model=.*vocabulary has 96 tokens"):
        LLM(target, device="cpu", tensor_parallel_size=2, kv_cache_max_tokens=4096, speculative_model=draft)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("tensorjet-tp-worker")]
    assert not torch.distributed.is_initialized()


@pytest.mark.slow  # starts a worker process and kills it
def test_a_killed_worker_fails_health_and_pending_requests_within_10_s(tiny_dir):
    llm = LLM(model=str(tiny_dir), device="cpu", tensor_parallel_size=2, kv_cache_max_tokens=4096)
    try:
        with running_server(build_app(llm, SERVED)) as url:
            assert httpx.get(f"{url}/health").status_code == 200
            body = {"model": "tp", "prompt": PLAIN[0], "max_tokens": 3000, "ignore_eos": True}
            pending: dict = {}

            def complete() -> None:
                pending["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

            request = threading.Thread(target=complete)
            request.start()
            stream = httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60)
            with stream as events:
                lines = events.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # generating
                deadline = time.monotonic() + 30
                while llm.stats()["num_requests_running"] < 2:
                    assert time.monotonic() < deadline, "the non-streaming request never started"
                    time.sleep(0.01)
                (pid,) = llm.engine.runner.parallel.workers.pids.values()
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                rest = [line for line in lines if line.startswith("data:")]
            request.join(timeout=10)
            assert time.monotonic() - killed < 10
            assert pending["response"].status_code == 503
            assert "tensor-parallel worker 1" in pending["response"].json()["error"]["message"]
            assert "service_unavailable" in rest[-2] and "tensor-parallel worker 1" in rest[-2], rest[-2:]
            assert rest[-1] == "data: [DONE]"
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and "worker 1" in health.json()["error"]["message"]
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 503
    finally:
        llm.shutdown()


@pytest.mark.slow  # two torchrun launchers, each starting one rank of the server
def test_torchrun_with_two_nodes_on_localhost_serves_a_request(tiny_dir, tokenizer, tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    rendezvous_port, http_port = ports
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]

    def node(rank: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        argv += [
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(rendezvous_port),
        ]
        argv += ["-m", "tensorjet.serve", str(tiny_dir), "--served_model_name", "tp", "--device", "cpu"]
        argv += ["--tensor_parallel_size", "2", "--kv_cache_max_tokens", "4096", "--port", str(http_port)]
        with open(logs[rank], "w") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    nodes = [node(0), node(1)]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(n.poll() is None for n in nodes), logs[0].read_text() + logs[1].read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, logs[0].read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        served = client.completions.create(model="tp", prompt=PLAIN[0], max_tokens=NEW_TOKENS, temperature=0)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        reference = hf_greedy(hf_model, tokenizer.encode(PLAIN[0]), NEW_TOKENS, tokenizer.eos_token_id)
        assert served.choices[0].text == tokenizer.decode(reference.token_ids, skip_special_tokens=True)
        # SIGTERM to rank 0 (the launcher's child; uvicorn ends it by that signal once the server is down):
        # it stops rank 1, whose launcher then exits 0.
        (rank0,) = Path(f"/proc/{nodes[0].pid}/task/{nodes[0].pid}/children").read_text().split()
        os.kill(int(rank0), signal.SIGTERM)
        assert nodes[1].wait(timeout=60) == 0, logs[1].read_text()
        nodes[0].wait(timeout=60)
        assert "Finished server process" in logs[0].read_text()
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
