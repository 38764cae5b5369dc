"""PyTorch's tinygemm INT4 product over tensorjet's weights (`tensorjet.kernels.int4_tinygemm`): the
layout conversion (zero points, act order, bias) against the reference, the shapes it refuses, and an
INT4 layer running its small batches through it. On the CPU the same product runs through its CPU packing."""

from __future__ import annotations

import pytest
import torch

from tensorjet.kernels.int4_reference import Int4Weight, int4_linear_reference
from tensorjet.kernels.int4_tinygemm import (
    pack_tinygemm,
    tinygemm_bytes,
    tinygemm_linear,
    tinygemm_unsupported,
)
from tensorjet.layers.linear import Linear
from tensorjet.quant import int4_packing as packing
from tensorjet.quant.int4 import Int4LinearMethod, Int4Scheme

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weight(n: int, k: int, group: int, zeros: bool, act_order: bool, seed: int = 0) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    zero_points = torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8) if zeros else None
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    weight = Int4Weight(packing.pack_int32(codes, 1), scales, zero_points, perm, group, k)
    return Int4Weight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in vars(weight).values()))


def _assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, weight: Int4Weight, bias) -> None:
    """Within bf16's rounding of x, of each dequantized weight and of the result: a code in the wrong
    nibble, a zero point of the wrong sign or a column out of order is off by the output's own size."""
    reference = int4_linear_reference(x.float(), weight, None if bias is None else bias.float())
    scale = reference.abs().max().item()
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("zeros", [False, True], ids=["symmetric", "zero-points"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("group", [32, 128])
def test_tinygemm_computes_the_reference_product(zeros, act_order, group):
    weight = _weight(64, 256, group, zeros, act_order)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(64).to(torch.bfloat16).to(DEVICE)
    y = tinygemm_linear(x, pack_tinygemm(weight), bias)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 64)
    _assert_close_to_reference(y, x, weight, bias)


def test_a_misplaced_zero_point_fails_the_check():
    """The check above can fail: the same codes read with every zero point at 8 give another product."""
    weight = _weight(64, 256, 128, zeros=True, act_order=False)
    symmetric = Int4Weight(weight.qweight, weight.scales, None, None, 128, 256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(AssertionError):
        _assert_close_to_reference(tinygemm_linear(x, pack_tinygemm(symmetric)), x, weight, None)


@pytest.mark.parametrize(
    "n, k, group, dtype, reason",
    [
        (64, 256, 128, torch.float16, "activations in torch.float16"),
        (64, 256, 16, torch.bfloat16, "group size 16"),
        (64, 200, 8, torch.bfloat16, "group size 8"),
        (64, 192, 64, torch.bfloat16, "192 input columns"),
        (40, 256, 128, torch.bfloat16, "40 output rows"),
    ],
)
def test_what_tinygemm_cannot_run_is_named(n, k, group, dtype, reason):
    codes, scales = torch.zeros(n, -(-k // 8), dtype=torch.int32), torch.ones(n, -(-k // group))
    weight = Int4Weight(codes, scales, None, None, group, k)
    assert reason in tinygemm_unsupported(weight, dtype)
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match=reason):
            pack_tinygemm(weight)


def test_an_int4_layer_runs_its_small_batches_through_tinygemm_and_larger_ones_as_before():
    method = Int4LinearMethod(Int4Scheme("awq", 128, zero_points=True))
    layer = Linear(256, [64, 32], bias=True, dtype=torch.bfloat16, method=method).to(DEVICE)
    method.init_dummy_weights(layer, torch.Generator(DEVICE).manual_seed(0))
    weight = method.weight
    assert method.fusable
    method.use_tinygemm(layer, max_rows=4)
    names = {name for name, _ in layer.named_parameters()}
    assert {"qweight", "scales", "qzeros", "tinygemm_packed", "tinygemm_scales_and_zeros"} <= names
    assert method.weight is weight and not method.fusable and not method.supports_fused
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(layer(x[:4]), tinygemm_linear(x[:4], method.tinygemm, layer.bias))
    assert torch.equal(layer(x), method.kernels.for_rows(5)(x, weight, layer.bias))
    _assert_close_to_reference(layer(x[:4]), x[:4], weight, layer.bias)


def test_the_tinygemm_copy_takes_the_memory_it_is_counted_at():
    weight = _weight(64, 256, 128, zeros=True, act_order=False)
    tiny = pack_tinygemm(weight)
    used = sum(t.numel() * t.element_size() for t in (tiny.packed, tiny.scales_and_zeros))
    assert used == tinygemm_bytes(weight)


@pytest.mark.parametrize(
    "total_memory, expected", [(10**9, [4, 0]), (5 * 10**4, [0, 0])], ids=["fits", "too-big"]
)
def test_tinygemm_copies_are_made_only_within_their_share_of_the_gpu(monkeypatch, total_memory, expected):
    """Start-up gives tinygemm copies to the layers it wins on, unless together they would take more
    than TINYGEMM_MEMORY_SHARE of the GPU's memory (the one taker's copy: 8,704 bytes)."""
    from types import SimpleNamespace

    from tensorjet.runtime import kernel_selection

    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_memory)
    )
    layers = []
    for seed in range(2):
        method = Int4LinearMethod(Int4Scheme("awq", 128, zero_points=True))
        layer = Linear(256, [64], dtype=torch.bfloat16, method=method).to(DEVICE)
        method.init_dummy_weights(layer, torch.Generator(DEVICE).manual_seed(seed))
        layers.append(layer)
    kernel_selection._use_tinygemm(layers, [4, 0], DEVICE)
    assert [layer.method.tinygemm_max_rows for layer in layers] == expected
    assert [layer.method.tinygemm is not None for layer in layers] == [rows > 0 for rows in expected]
