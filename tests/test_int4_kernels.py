"""INT4 packing and the W4A16 kernels (under TRITON_INTERPRET=1, set by conftest) against the PyTorch
reference: every format's packing round-trips and matches its published unpacking, and the Triton
GEMV / GEMM / dequantization and the fused batch-1 GEMV compute the reference's numerics at small
sizes, with zero points or without, act-order permutations, ragged K and every group size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tensorjet.kernels import activation, norm
from tensorjet.kernels import int4_fused_gemv as fused_module
from tensorjet.kernels import int4_linear as linear_module
from tensorjet.kernels.int4_fused_gemv import CANDIDATES as FUSED_CANDIDATES
from tensorjet.kernels.int4_fused_gemv import Int4FusedGemvConfig
from tensorjet.kernels.int4_linear import GEMM_CANDIDATES, GEMV_CANDIDATES, Int4MatmulConfig, even_split
from tensorjet.kernels.int4_reference import Int4Weight, dequantize, int4_linear_reference
from tensorjet.quant import int4_packing as packing

# Inputs and references are made on the CPU; on a machine with a GPU the kernels run there, compiled.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _moved(value, device, copies: list):
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
        copies.append((value, moved))
        return moved
    if isinstance(value, Int4Weight):
        fields = {f.name: _moved(getattr(value, f.name), device, copies) for f in dataclasses.fields(value)}
        return Int4Weight(**fields)
    return value


def _on_device(kernel):
    """`kernel` run on DEVICE with its tensor arguments moved there; tensors it updates in place are
    copied back into the caller's, and its result comes back to the CPU."""
    if DEVICE.type == "cpu":
        return kernel

    def run(*args, **kwargs):
        copies: list = []
        out = kernel(
            *(_moved(a, DEVICE, copies) for a in args),
            **{k: _moved(v, DEVICE, copies) for k, v in kwargs.items()},
        )
        for original, moved in copies:
            original.copy_(moved)
            if out is moved:  # a tensor updated in place and returned (the residual)
                return original
        return out.cpu()

    return run


int4_gemv = _on_device(linear_module.int4_gemv)
int4_gemm = _on_device(linear_module.int4_gemm)
int4_matmul = _on_device(linear_module.int4_matmul)
int4_dequantize = _on_device(linear_module.int4_dequantize)
dequantized_linear = _on_device(linear_module.dequantized_linear)
int4_fused_gemv = _on_device(fused_module.int4_fused_gemv)
# The reference chain's norm and SiLU are Triton kernels too.
rms_norm = _on_device(norm.rms_norm)
silu_and_mul = _on_device(activation.silu_and_mul)


def _codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


# ---- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("count", [16, 21])
def test_int32_packing_round_trips_along_either_dim(dim, count):
    codes = _codes(count, 5) if dim == 0 else _codes(5, count)
    words = packing.pack_int32(codes, dim)
    assert words.dtype == torch.int32 and words.shape[dim] == -(-count // 8)
    assert torch.equal(packing.unpack_int32(words, dim, count), codes.to(torch.uint8))


def test_codes_sit_in_their_nibbles_in_order():
    words = packing.pack_int32(torch.arange(8, dtype=torch.int32)[None, :] + 8, 1)
    assert words.item() == int.from_bytes(bytes([0x98, 0xBA, 0xDC, 0xFE]), "little", signed=True)


def test_awq_packing_matches_autoawqs_published_unpacking():
    """AutoAWQ's `unpack_awq` + `reverse_awq_order`: nibbles in order, then columns taken in the
    order [0, 4, 1, 5, 2, 6, 3, 7] of each word."""
    codes = _codes(6, 32)
    words = packing.pack_awq(codes)
    nibbles = ((words[:, :, None] >> torch.arange(0, 32, 4)) & 15).reshape(6, -1)
    reverse = torch.arange(32).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    assert torch.equal(nibbles[:, reverse], codes)
    assert torch.equal(packing.unpack_awq(words), codes.to(torch.uint8))


def test_gptq_packing_and_its_v1_zero_points():
    codes, zeros = _codes(24, 32), _codes(24, 2, seed=1).clamp(min=1)
    qweight = packing.pack_gptq_weight(codes)
    assert qweight.shape == (4, 24)  # [K / 8, N]
    assert torch.equal(packing.unpack_gptq_weight(qweight), codes.to(torch.uint8))
    qzeros = packing.pack_gptq_zeros(zeros, v1=True)
    assert qzeros.shape == (2, 3)
    # v1 stores zero - 1: unpacked plainly, every nibble is one less
    assert torch.equal(packing.unpack_gptq_zeros(qzeros, 24, v1=False), (zeros - 1).to(torch.uint8))
    assert torch.equal(packing.unpack_gptq_zeros(qzeros, 24, v1=True), zeros.to(torch.uint8))
    with pytest.raises(ValueError, match="zero point of 0"):
        packing.pack_gptq_zeros(torch.zeros(8, 1, dtype=torch.int32), v1=True)


def test_a_stored_v1_zero_of_15_reads_as_16():
    qzeros = packing.pack_int32(torch.full((1, 8), 15), 1)
    assert packing.unpack_gptq_zeros(qzeros, 8, v1=True).unique().tolist() == [16]


def test_compressed_tensors_zero_points_pack_along_n():
    zeros = _codes(13, 3)
    words = packing.pack_compressed_tensors_zeros(zeros)
    assert words.shape == (2, 3)
    assert torch.equal(packing.unpack_compressed_tensors_zeros(words, 13), zeros.to(torch.uint8))


def test_codes_outside_four_bits_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        packing.pack_int32(torch.tensor([[16]]), 1)


# ---- products -------------------------------------------------------------------------------------


def _weight(n: int, k: int, group: int, *, zeros: bool, act_order: bool, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).to(dtype)
    zero_points = torch.randint(0, 17, (n, groups), generator=gen).to(torch.uint8) if zeros else None
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    return Int4Weight(packing.pack_int32(_codes(n, k, seed=seed), 1), scales, zero_points, perm, group, k)


def test_the_reference_dequantizes_code_minus_zero_times_scale():
    weight = _weight(16, 40, 8, zeros=True, act_order=True)
    codes = packing.unpack_int32(weight.qweight, 1, 40).float()
    groups = torch.arange(40) // 8
    stored = (codes - weight.zeros.float()[:, groups]) * weight.scales[:, groups]
    assert torch.equal(dequantize(weight, stored_order=True), stored)
    dense = dequantize(weight)
    assert torch.equal(dense[:, weight.perm.long()], stored)  # stored column j is input column perm[j]
    x = torch.randn(3, 40)
    torch.testing.assert_close(int4_linear_reference(x, weight), x @ dense.T)


# (M, N, K, group size or -1 per channel, zero points, act order)
SHAPES = [
    (1, 64, 128, 32, True, False),
    (1, 48, 256, 128, False, False),
    (3, 64, 200, 64, True, True),  # ragged K: 200 columns, a last group of 8
    (16, 32, 136, -1, True, False),  # per channel, K not a multiple of the tile
    (2, 32, 256, -1, True, False),  # per channel, whole tiles: the scale applied to the sum
    (5, 40, 60, -1, False, True),  # K not a multiple of 8: a padded word
]


def _group(k: int, group_size: int) -> int:
    return -(-k // 8) * 8 if group_size == -1 else group_size


@pytest.mark.parametrize("m, n, k, group_size, zeros, act_order", SHAPES)
@pytest.mark.parametrize(
    "config", [GEMV_CANDIDATES[0], GEMV_CANDIDATES[3], GEMV_CANDIDATES[4], GEMV_CANDIDATES[-2]], ids=str
)
def test_gemv_matches_the_reference(m, n, k, group_size, zeros, act_order, config):
    weight = _weight(n, k, _group(k, group_size), zeros=zeros, act_order=act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n)
    y = int4_gemv(x, weight, bias, config=config)
    torch.testing.assert_close(y, int4_linear_reference(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, n, k, group_size, zeros, act_order", SHAPES[2:])
def test_gemm_matches_the_reference(m, n, k, group_size, zeros, act_order):
    weight = _weight(n, k, _group(k, group_size), zeros=zeros, act_order=act_order)
    x = torch.randn(m + 30, k, generator=torch.Generator().manual_seed(3))  # past one 32-row tile
    torch.testing.assert_close(int4_gemm(x, weight), int4_linear_reference(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "group, act_order", [(128, False), (32, True)], ids=["one-group-tiles", "act-order-g32"]
)
@pytest.mark.parametrize("config", GEMM_CANDIDATES, ids=str)
def test_every_gemm_tile_matches_the_reference(config, group, act_order):
    """Each tile start-up timing may choose, at tens of rows (on a GPU, K split to fill its SMs); a
    tile that needs groups of whole tiles refuses a narrower group."""
    weight = _weight(96, 1024, group, zeros=True, act_order=act_order)
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(4))
    if not config.fits(weight):
        with pytest.raises(ValueError, match="needs groups of whole tiles; got group_size 32"):
            int4_gemm(x, weight, config=config)
        return
    y = int4_gemm(x, weight, config=config)
    torch.testing.assert_close(y, int4_linear_reference(x, weight), rtol=1e-5, atol=1e-5)


# (M, N, K, group size or -1 per channel, zero points, act order): groups of whole 128-column tiles
SPREAD_SHAPES = [
    (1, 48, 256, 128, False, False),
    (3, 64, 384, 128, True, True),
    (20, 40, 256, -1, True, False),  # per channel; N not a multiple of the tile
    (33, 64, 200, 128, True, False),  # ragged K: the last tile masked
]


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("m, n, k, group_size, zeros, act_order", SPREAD_SHAPES)
def test_spread_tiles_match_the_reference(m, n, k, group_size, zeros, act_order, split_k):
    """x the first operand, the dequantized tile through the dot, one accumulator over K."""
    weight = _weight(n, k, _group(k, group_size), zeros=zeros, act_order=act_order)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(8))
    bias = torch.randn(n)
    config = Int4MatmulConfig(16, 32, 128, 4, 3, split_k=split_k, unpack="spread")
    y = int4_matmul(x, weight, bias, config=config)
    torch.testing.assert_close(y, int4_linear_reference(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_spread_tiles_do_not_scale_after_the_sum():
    with pytest.raises(ValueError, match="spread tiles hold dequantized weights"):
        Int4MatmulConfig(16, 64, 128, 4, 3, scale_after=True, unpack="spread")


def test_bf16_dequantized_spread_tiles_round_each_weight_once():
    """Scaling before the sum, each weight is (code - zero) x scale rounded to bf16 (compiled, by two
    packed FMAs per pair of codes), then summed in fp32: off the exact product by at most an ulp of each
    weight and of the result. (The interpreter rounds to bf16 towards zero, a full ulp; a zero point
    off by one would be off by an eighth of sum |x| |w|.)"""
    weight = _weight(64, 512, 128, zeros=True, act_order=True, dtype=torch.bfloat16)
    x = torch.randn(24, 512, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    y = int4_matmul(x, weight, config=Int4MatmulConfig(16, 64, 128, 4, 3, unpack="spread"))
    w = dequantize(weight, torch.float32).double()
    exact = x.double() @ w.T
    bound = 2.0**-7 * exact.abs() + 2.0**-7 * (x.double().abs() @ w.abs().T)
    assert bool(((y.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize(
    "tiles, k_tiles, split",
    [(96, 32, 2), (64, 32, 4), (64, 112, 4), (224, 32, 1), (32, 32, 8), (44, 7, 3), (8, 2, 1)],
)
def test_k_is_split_to_fill_the_sms_in_even_slices(tiles, k_tiles, split):
    """132 SMs: enough slices to fill them, rounded up to a count that divides K's tiles (3 slices of
    7 tiles: none divides, the fill stands; 2 tiles of K: never a slice of one tile)."""
    assert even_split(tiles, k_tiles, 132) == split


def test_an_unknown_unpacking_is_refused():
    with pytest.raises(ValueError, match="unpack must be one of"):
        Int4MatmulConfig(16, 64, 128, unpack="shuffle")


def test_a_group_narrower_than_the_tile_reads_a_scale_per_column():
    weight = _weight(32, 256, 32, zeros=True, act_order=False)
    x = torch.randn(2, 256)
    y = int4_matmul(x, weight, config=Int4MatmulConfig(16, 32, 128, split_k=2))
    torch.testing.assert_close(y, int4_linear_reference(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [64, 256], ids=["scaled-weights", "scale-after"])
def test_bf16_activations(group_size):
    """bf16, against the exact product of x and the fp32 dequantized weight. A tile spanning groups
    rounds each scaled weight to bf16 as the reference does (within an ulp of each weight: the
    interpreter's conversion truncates, the GPU's rounds to nearest); a tile in one group multiplies
    exact code - zero values and scales the fp32 sum: only the result's own rounding."""
    weight = _weight(64, 512, group_size, zeros=True, act_order=True, dtype=torch.bfloat16)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = int4_gemv(x, weight)
    assert y.dtype == torch.bfloat16
    w = dequantize(weight, torch.float32).double()
    exact = x.double() @ w.T
    ulp = 2.0**-7  # bf16's spacing, relative (truncation: a full one)
    bound = ulp * exact.abs() + 1e-9
    if group_size == 64:
        bound += ulp * (x.double().abs() @ w.abs().T)
    assert bool(((y.double() - exact).abs() <= bound).all())


def test_split_k_leaves_its_counters_at_zero_for_the_next_launch():
    weight = _weight(64, 256, 32, zeros=False, act_order=False)
    x = torch.randn(1, 256)
    config = GEMV_CANDIDATES[4]
    first = int4_gemv(x, weight, config=config)
    assert torch.equal(int4_gemv(x, weight, config=config), first)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_kernel_and_dequantized_linear_match_the_reference(act_order):
    weight = _weight(40, 200, 64, zeros=True, act_order=act_order)
    assert torch.equal(int4_dequantize(weight, torch.float32), dequantize(weight))
    x = torch.randn(4, 200)
    torch.testing.assert_close(dequantized_linear(x, weight), int4_linear_reference(x, weight))


def test_a_wrong_input_width_is_refused():
    weight = _weight(16, 64, 32, zeros=False, act_order=False)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        int4_gemm(torch.randn(1, 32), weight)
    with pytest.raises(ValueError, match="up to 16 rows"):
        int4_gemv(torch.randn(17, 64), weight)


# ---- the fused batch-1 product --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [
        FUSED_CANDIDATES[0],
        Int4FusedGemvConfig(32, 128, split_k=3),
        Int4FusedGemvConfig(32, 128, 2, 4, split_k=2),
        Int4FusedGemvConfig(64, 128, fma=True),
        Int4FusedGemvConfig(16, 128, split_k=3, fma=True),
    ],
    ids=["plain", "split3", "two-warps-split2", "fma", "fma-split3"],
)
@pytest.mark.parametrize("group_size", [64, 256], ids=["scaled-weights", "scale-after"])
def test_fused_gemv_matches_the_chain_of_separate_kernels(dtype, config, group_size):
    """Plain, RMSNorm before, residual add after, SiLU-and-multiply of [gate; up], with act order and
    zero points: each against the reference product with the separate norm / add / SiLU kernels."""
    n, k, eps = 24, 200, 1e-5  # ragged K: a tile and a half (split three ways: one slice empty)
    weight = _weight(2 * n, k, group_size, zeros=True, act_order=True, dtype=dtype)
    if config.fma and group_size % config.block_k:
        assert config not in fused_module.candidates_for(weight)
        with pytest.raises(ValueError, match="FMA tile needs groups of whole tiles"):
            int4_fused_gemv(torch.randn(1, k).to(dtype), weight, None, config)
        return
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(1, k, generator=gen)).to(dtype)  # not unit scale: the norm must matter
    norm_w = (1 + 0.5 * torch.randn(k, generator=gen)).to(dtype)
    bias = torch.randn(2 * n, generator=gen).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]

    def close(out, ref):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)

    close(int4_fused_gemv(x, weight, bias, config), int4_linear_reference(x, weight, bias))
    normed = rms_norm(x, norm_w, eps)
    out = int4_fused_gemv(x, weight, bias, config, norm_weight=norm_w, eps=eps)
    close(out, int4_linear_reference(normed, weight, bias))
    residual = torch.randn(1, 2 * n, generator=gen).to(dtype)
    before = residual.clone()
    out = int4_fused_gemv(x, weight, bias, config, residual=residual)
    assert out is residual, "the residual is updated in place"
    close(residual, before.float() + int4_linear_reference(x, weight, bias).float())
    out = int4_fused_gemv(x, weight, bias, config, norm_weight=norm_w, eps=eps, silu_mul=True)
    assert out.shape == (1, n)
    close(out, silu_and_mul(int4_linear_reference(normed, weight, bias)))


def test_fused_gemv_refuses_what_it_cannot_fuse():
    weight = _weight(16, 64, 32, zeros=False, act_order=False)
    with pytest.raises(ValueError, match=r"x \[1, 64\]"):
        int4_fused_gemv(torch.randn(2, 64), weight)
    with pytest.raises(ValueError, match="do not combine"):
        int4_fused_gemv(torch.randn(1, 64), weight, residual=torch.zeros(1, 8), silu_mul=True)
