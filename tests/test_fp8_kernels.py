"""FP8 W8A8 linear products: the PyTorch reference's properties, and every kernel against it.

The Triton kernels run under the interpreter on a machine without a GPU (tests/conftest.py) and
compiled on one. `torch._scaled_mm` runs only on CUDA sm89+, so `scaled_mm_linear` is tested there
alone. The kernels compute the reference's quantized values exactly and differ only in how their
fp32 sums are ordered (and, on Hopper's FP8 tensor cores, in partial sums of up to 128 products kept
at less than fp32 precision before they join the fp32 accumulator), so
- fp32 outputs are checked against the reference to `FP32_TOL`;
- bf16/fp16 outputs element by element to one unit in the last place of the fp32 result (the
  interpreter truncates to bf16 where the GPU rounds to nearest).
"""

import os

import pytest
import torch
from numerics import rel_err

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tensorjet.dtypes import FP8_MAX  # noqa: E402
from tensorjet.kernels.activation import silu_and_mul  # noqa: E402
from tensorjet.kernels.fp8_fused_gemv import CANDIDATES as FUSED_CANDIDATES  # noqa: E402
from tensorjet.kernels.fp8_fused_gemv import Fp8FusedGemvConfig, fp8_fused_gemv  # noqa: E402
from tensorjet.kernels.fp8_linear import (  # noqa: E402
    CANDIDATES,
    GEMM_CANDIDATES,
    MAX_M,
    Fp8GemmConfig,
    Fp8GemvConfig,
    fp8_gemm,
    fp8_gemv,
    quantize_per_token_triton,
    scaled_mm_linear,
)
from tensorjet.kernels.fp8_reference import (  # noqa: E402
    fp8_linear_reference,
    quantize_per_token,
    quantize_weight_per_channel,
)
from tensorjet.kernels.norm import rms_norm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16]
# fp32 results: summation order only on the CPU; Hopper's FP8 MMA partial sums on a GPU.
FP32_TOL = 1e-6 if DEVICE.type == "cpu" else 1e-3
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
# Every E4M3 value (finite, each sign) in increasing order.
E4M3_GRID = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float().unique()
E4M3_GRID = E4M3_GRID[~E4M3_GRID.isnan()]


def cross(*axes: list) -> list:
    """Every combination of one value per axis as pytest params; the first max(len(axis)) cases take
    value i % len(axis) of every axis (each value runs at least once: the fast tier), the rest are
    `slow` (as tests/test_kernels.py's `cross`)."""
    import itertools

    fast = {tuple(i % len(axis) for axis in axes) for i in range(max(map(len, axes)))}
    params = []
    for index in itertools.product(*(range(len(axis)) for axis in axes)):
        values = [axis[i] for axis, i in zip(axes, index)]
        name = "-".join(str(v).removeprefix("torch.") for v in values)
        params.append(pytest.param(*values, id=name, marks=() if index in fast else pytest.mark.slow))
    return params


def random_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An E4M3 weight [N, K] and its scales, quantized from rows of different magnitudes."""
    w = torch.randn(n, k, device=DEVICE) / k**0.5 * torch.logspace(-2, 1, n, device=DEVICE)[:, None]
    return quantize_weight_per_channel(w)


def random_x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different magnitudes (each gets its own scale), one all zeros where there are 3+."""
    x = torch.randn(m, k, device=DEVICE) * torch.logspace(-3, 3, m, device=DEVICE)[:, None]
    if m >= 3:
        x[1] = 0.0
    return x.to(dtype)


def assert_matches(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str, seed: int) -> None:
    """`out` (in `dtype`) against the reference's fp32 result `exact`: see the module docstring."""
    assert out.dtype == dtype and out.shape == exact.shape, f"{what}: {out.dtype} {out.shape}"
    assert not out.isnan().any(), f"{what}: NaN in output, seed={seed}"
    if dtype == torch.float32:
        assert rel_err(out, exact) < FP32_TOL, (
            f"{what}: relative error {rel_err(out, exact):.3g}, seed={seed}"
        )
        return
    err = (out.double() - exact.double()).abs()
    bound = 2.0 ** -MANTISSA_BITS[dtype] * exact.double().abs() + FP32_TOL * exact.double().abs().max()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: {out.flatten()[worst].item()} vs {exact.flatten()[worst].item()}, seed={seed}"
    )


def exact_product(x, weight, weight_scale, bias, input_scale) -> torch.Tensor:
    """The reference's fp32 result before it is cast to x's dtype (x.float() quantizes the same)."""
    return fp8_linear_reference(x.float(), weight, weight_scale, bias, input_scale)


# ---- the reference --------------------------------------------------------------------------------


def test_quantize_weight_per_channel(seed):
    n, k = 24, 100
    w = torch.randn(n, k, device=DEVICE) * torch.logspace(-6, 4, n, device=DEVICE)[:, None]
    w[3] = 0.0
    wq, scale = quantize_weight_per_channel(w.bfloat16())
    assert wq.dtype == FP8 and wq.shape == (n, k) and scale.dtype == torch.float32 and scale.shape == (n,)
    amax = w.bfloat16().float().abs().amax(1)
    tiny = (torch.tensor(1e-12).double() / FP8_MAX).float().item()
    assert scale[3].item() == tiny, "an all-zero row keeps a finite scale"
    assert (wq[3].float() == 0).all()
    nonzero = amax > 0
    # Each row's absolute maximum maps to exactly 448.
    assert (wq.float().abs().amax(1)[nonzero] == FP8_MAX).all()
    # E4M3 rounding: within half a unit in the last place (2^-4 relative; 2^-10 absolute among subnormals).
    err = (wq.float() * scale[:, None] - w.bfloat16().float()).abs()
    bound = torch.maximum(2.0**-4 * w.bfloat16().float().abs(), 2.0**-10 * scale[:, None])
    assert (err <= bound * (1 + 1e-6)).all(), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_reference(dtype, seed):
    x = random_x(5, 70, dtype)
    xq, x_scale = quantize_per_token(x)
    assert (
        xq.dtype == FP8 and xq.shape == x.shape and x_scale.dtype == torch.float32 and x_scale.shape == (5, 1)
    )
    xf = x.float()
    # Rounded once: float64 division then float32 rounding is the correctly rounded float32 quotient.
    assert torch.equal(x_scale, (xf.abs().amax(1, keepdim=True).clamp(min=1e-12).double() / FP8_MAX).float())
    assert (xq[1].float() == 0).all(), "an all-zero row quantizes to zeros"
    err = (xq.float() * x_scale - xf).abs()
    assert (err <= torch.maximum(2.0**-4 * xf.abs(), 2.0**-10 * x_scale) * (1 + 1e-6)).all(), f"seed={seed}"

    # Static: one scale for every row; values past +-448 saturate, never NaN.
    input_scale = torch.tensor(0.5, device=DEVICE)
    xq, x_scale = quantize_per_token(x, input_scale)
    assert x_scale.shape == (5, 1) and (x_scale == 0.5).all()
    assert torch.equal(xq.float(), (xf / 0.5).clamp(-FP8_MAX, FP8_MAX).to(FP8).float())
    assert xq.float().abs().max() == FP8_MAX and not xq.float().isnan().any()


def test_reference_computes_the_dequantized_product(seed):
    m, n, k = 4, 33, 96
    x = random_x(m, k, torch.float32)
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    wq, ws = quantize_weight_per_channel(w)
    bias = torch.randn(n, device=DEVICE)
    xq, xs = quantize_per_token(x)
    dequantized = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).T + bias.double()
    y = fp8_linear_reference(x, wq, ws, bias)
    assert y.dtype == torch.float32 and rel_err(y, dequantized) < 1e-6, f"seed={seed}"
    # ...which is the float product up to FP8 rounding (a few percent), not something else.
    full = x.double() @ w.double().T + bias.double()
    assert rel_err(y, full) < 0.08, f"seed={seed}"
    assert fp8_linear_reference(x.bfloat16(), wq, ws, bias.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("static", [False, True])
def test_reference_takes_an_e4m3_grid_float_weight(static, seed):
    """A float copy of the E4M3 weight (bf16 or fp32) gives the very same result as the E4M3 one."""
    x = random_x(6, 80, torch.bfloat16)
    wq, ws = random_weight(20, 80)
    bias = torch.randn(20, device=DEVICE).bfloat16()
    input_scale = torch.tensor(0.03, device=DEVICE) if static else None
    y = fp8_linear_reference(x, wq, ws, bias, input_scale)
    for copy in (wq.to(torch.bfloat16), wq.float()):
        assert torch.equal(fp8_linear_reference(x, copy, ws, bias, input_scale), y), f"{copy.dtype}"


# ---- per-token quantization kernel ------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,k", cross([torch.float32, torch.bfloat16, torch.float16], [1, 130, 2048, 5000])
)
def test_quantize_per_token_triton(dtype, k, seed):
    x = random_x(4, k, dtype)
    for input_scale in (None, torch.tensor(0.07, device=DEVICE)):
        xq_ref, scale_ref = quantize_per_token(x, input_scale)
        xq, scale = quantize_per_token_triton(x, input_scale)
        assert xq.dtype == FP8 and scale.shape == (4, 1) and scale.dtype == torch.float32
        assert torch.equal(scale, scale_ref), f"static={input_scale is not None}, seed={seed}"
        # Values, not bytes: the kernel writes +0 for an input of -0.0, where torch keeps the sign.
        assert torch.equal(xq.float(), xq_ref.float()), f"static={input_scale is not None}, seed={seed}"


def test_quantization_rounds_every_e4m3_tie_to_even():
    """Through a static scale of 1: every E4M3 value, every midpoint between neighbours (a tie: to the
    even one), just either side of each midpoint, past 448 (saturates) and the subnormals."""
    grid = E4M3_GRID.to(DEVICE)
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat(
        [
            grid,
            mid,
            mid.nextafter(grid[1:]),
            mid.nextafter(grid[:-1]),
            torch.tensor([449.0, 465.0, -1e6], device=DEVICE),
        ]
    )
    x = x[None, :]
    one = torch.tensor(1.0, device=DEVICE)
    expected = x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    assert torch.equal(quantize_per_token_triton(x, one)[0].float(), expected)
    assert torch.equal(quantize_per_token(x, one)[0].float(), expected)
    # The GEMV quantizes the same way: multiply by an identity weight (scale 1) to see x's E4M3 values.
    n = 32
    sample = x[:, torch.linspace(0, x.shape[1] - 1, n, device=DEVICE).long()]
    eye = torch.eye(n, device=DEVICE).to(FP8)
    ones = torch.ones(n, device=DEVICE)
    assert torch.equal(
        fp8_gemv(sample, eye, ones, None, one), sample.clamp(-FP8_MAX, FP8_MAX).to(FP8).float()
    )


def test_quantization_divides_exactly():
    """x / scale is the correctly rounded quotient: with a scale of 63 and x 63 times each E4M3
    midpoint, x / 63 is exactly the midpoint (a tie, to even), where x * RN(1/63) lands just off 250
    of the 252 midpoints and rounds to the nearer neighbour, odd or even. A row whose maximum is
    63 * 448 gets the per-token scale 63."""
    grid = E4M3_GRID.to(DEVICE)
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([63 * mid[mid.abs() < 448], torch.tensor([63 * FP8_MAX], device=DEVICE)])[None, :]
    expected = (x / torch.full_like(x, 63.0)).to(FP8).float()
    scale = torch.tensor(63.0, device=DEVICE)
    for input_scale in (scale, None):
        xq, x_scale = quantize_per_token_triton(x, input_scale)
        assert (x_scale == 63.0).all() and torch.equal(xq.float(), expected), (
            f"static={input_scale is not None}"
        )
        assert torch.equal(quantize_per_token(x, input_scale)[0].float(), expected)
    n = 32  # the GEMV and the fused GEMV through identity weights, as above
    picks = torch.linspace(0, x.shape[1] - 2, n, device=DEVICE).long()
    sample, sample_expected = x[:, picks], expected[:, picks]
    eye, ones = torch.eye(n, device=DEVICE).to(FP8), torch.ones(n, device=DEVICE)
    assert torch.equal(fp8_gemv(sample, eye, ones, None, scale), 63 * sample_expected)
    for config in FUSED_CANDIDATES[0], next(c for c in FUSED_CANDIDATES if c.tensor_cores):
        assert torch.equal(fp8_fused_gemv(sample, eye, ones, None, scale, config), 63 * sample_expected)


# ---- GEMV / GEMM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,m,bias,static", cross(DTYPES, list(range(1, MAX_M + 1)), [False, True], [False, True])
)
def test_fp8_gemv(dtype, m, bias, static, seed):
    n, k = 70, 300  # neither a multiple of any block size
    x = random_x(m, k, dtype)
    wq, ws = random_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    input_scale = torch.tensor(0.02, device=DEVICE) if static else None
    exact = exact_product(x, wq, ws, b, input_scale)
    for config in CANDIDATES[:2] if DEVICE.type == "cpu" else CANDIDATES:
        out = fp8_gemv(x, wq, ws, b, input_scale, config=config)
        assert_matches(out, exact, dtype, f"fp8_gemv {config}", seed)


def test_fp8_gemv_strided_x_and_k_across_tiles(seed):
    """x a column slice of a wider tensor, K spanning several tiles with a ragged end."""
    m, n, k = 3, 130, 1100
    wide = random_x(m, k + 40, torch.bfloat16)
    x = wide[:, 17 : 17 + k]
    wq, ws = random_weight(n, k)
    assert_matches(fp8_gemv(x, wq, ws), exact_product(x, wq, ws, None, None), torch.bfloat16, "strided", seed)


@pytest.mark.parametrize("m,static", [(1, False), (5, True), (MAX_M, False)])
def test_fp8_gemv_split_k(m, static, seed):
    """K in slices summed by separate programs (the last to arrive adds them in order): the reference's
    result, bit-identical on a second launch (the arrival counters are left at zero)."""
    n, k = 70, 1100  # five tiles of 256 in three slices (two, two, one ragged) and one of 128 in eight
    x = random_x(m, k, torch.bfloat16)
    wq, ws = random_weight(n, k)
    input_scale = torch.tensor(0.02, device=DEVICE) if static else None
    exact = exact_product(x, wq, ws, None, input_scale)
    for config in Fp8GemvConfig(64, 256, 4, 4, split_k=3), Fp8GemvConfig(64, 128, 4, 4, split_k=8):
        out = fp8_gemv(x, wq, ws, None, input_scale, config=config)
        assert_matches(out, exact, torch.bfloat16, f"fp8_gemv {config}", seed)
        assert torch.equal(fp8_gemv(x, wq, ws, None, input_scale, config=config), out), "second launch"
    gemm = Fp8GemmConfig(32, 64, 64, split_k=3)  # M tiles of 32 rows, each with its own counter
    out = fp8_gemm(x.repeat(3, 1), wq, ws, None, input_scale, config=gemm)
    assert_matches(
        out, exact_product(x.repeat(3, 1), wq, ws, None, input_scale), torch.bfloat16, "gemm", seed
    )


@pytest.mark.parametrize("dtype,m,static", cross(DTYPES, [1, 17, 40, 100], [False, True]))
def test_fp8_gemm(dtype, m, static, seed):
    n, k = 150, 200
    x = random_x(m, k, dtype)
    wq, ws = random_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype)
    input_scale = torch.tensor(0.02, device=DEVICE) if static else None
    exact = exact_product(x, wq, ws, b, input_scale)
    assert_matches(fp8_gemm(x, wq, ws, b, input_scale), exact, dtype, f"fp8_gemm m={m}", seed)
    if m == 100:  # every tile size on the same rows
        for config in GEMM_CANDIDATES:
            out = fp8_gemm(x, wq, ws, b, input_scale, config=config)
            assert_matches(out, exact, dtype, f"fp8_gemm {config}", seed)


def test_fp8_products_reject_bad_weights():
    x = torch.randn(2, 32, device=DEVICE)
    wq, ws = random_weight(16, 32)
    with pytest.raises(ValueError):
        fp8_gemv(x, wq.float(), ws)  # not E4M3
    with pytest.raises(ValueError):
        fp8_gemv(x, wq[:, :16], ws)  # K mismatch
    with pytest.raises(ValueError):
        fp8_gemv(torch.randn(MAX_M + 1, 32, device=DEVICE), wq, ws)
    with pytest.raises(ValueError):
        fp8_fused_gemv(x, wq, ws)  # two rows


# ---- fused batch-1 layer --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,bias,static", cross(DTYPES, [False, True], [False, True]))
def test_fp8_fused_gemv(dtype, bias, static, seed):
    """Plain, RMSNorm before (the normed row is what gets quantized), residual add after, SiLU-and-
    multiply of [gate; up]: each against the reference chain of separate kernels.

    A chain's norm sums its squares in another order than the fused kernel, so a normed value can
    differ in its last bit and, rarely, round to the neighbouring E4M3 value: the chains get a bound
    that allows a few such flips (`chain_tol`)."""
    n, k, eps = 43, 2100, 1e-5  # K spans several tiles
    x = (3 * torch.randn(1, k, device=DEVICE)).to(dtype)  # not unit scale: the norm must matter
    norm_w = (1 + 0.5 * torch.randn(k, device=DEVICE)).to(dtype)
    wq, ws = random_weight(2 * n, k)
    b = torch.randn(2 * n, device=DEVICE).to(dtype) if bias else None
    input_scale = torch.tensor(0.01, device=DEVICE) if static else None
    chain_tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]

    def assert_chain_close(out, ref, what):
        assert out.dtype == dtype and not out.isnan().any(), f"{what}: NaN or wrong dtype, seed={seed}"
        assert rel_err(out, ref) < chain_tol, f"{what}: relative error {rel_err(out, ref):.3g}, seed={seed}"

    normed = rms_norm(x, norm_w, eps)
    # On the CPU the first FMA and the first tensor-core candidate (each tile is a minute interpreted).
    first_of_each = [next(c for c in FUSED_CANDIDATES if c.tensor_cores == tc) for tc in (False, True)]
    for config in first_of_each if DEVICE.type == "cpu" else FUSED_CANDIDATES:
        out = fp8_fused_gemv(x, wq, ws, b, input_scale, config)
        assert_matches(out, exact_product(x, wq, ws, b, input_scale), dtype, f"fused {config}", seed)

        out = fp8_fused_gemv(x, wq, ws, b, input_scale, config, norm_weight=norm_w, eps=eps)
        assert_chain_close(out, fp8_linear_reference(normed, wq, ws, b, input_scale), f"+ norm {config}")

        residual_before = torch.randn(1, 2 * n, device=DEVICE).to(dtype)
        residual = residual_before.clone()
        out = fp8_fused_gemv(x, wq, ws, b, input_scale, config, residual=residual)
        assert out is residual, "the residual is updated in place"
        ref = residual_before.double() + fp8_linear_reference(x, wq, ws, b, input_scale).double()
        assert_chain_close(residual, ref, f"+ residual {config}")

        out = fp8_fused_gemv(x, wq, ws, b, input_scale, config, norm_weight=norm_w, eps=eps, silu_mul=True)
        assert out.shape == (1, n)
        ref = silu_and_mul(fp8_linear_reference(normed, wq, ws, b, input_scale))
        assert_chain_close(out, ref, f"+ norm + silu_mul {config}")


@pytest.mark.parametrize(
    "config",
    [
        Fp8FusedGemvConfig(16, 512, 4, split_k=3),  # K's five tiles: slices of two, two and one (ragged)
        Fp8FusedGemvConfig(64, 128, 4, 4, tensor_cores=True, split_k=8),  # six slices, two empty
    ],
    ids=["fma", "tensor-cores"],
)
def test_fp8_fused_gemv_split_k(config, seed):
    """Split over K, each slice summed by its own program and the last to arrive adding them up: the
    same results as the reference, with every fusion, twice in a row (the arrival counters are left
    at zero for the next launch), and bit-identical between launches (slices added in a fixed order)."""
    n, k, eps = 70, 2100, 1e-5
    x = (3 * torch.randn(1, k, device=DEVICE)).to(torch.bfloat16)
    norm_w = (1 + 0.5 * torch.randn(k, device=DEVICE)).to(torch.bfloat16)
    wq, ws = random_weight(2 * n, k)
    exact = exact_product(x, wq, ws, None, None)
    first = fp8_fused_gemv(x, wq, ws, config=config)
    assert_matches(first, exact, torch.bfloat16, f"split-K {config}", seed)
    assert torch.equal(fp8_fused_gemv(x, wq, ws, config=config), first), "a second launch differs"

    residual_before = torch.randn(1, 2 * n, device=DEVICE).to(torch.bfloat16)
    residual = residual_before.clone()
    fp8_fused_gemv(x, wq, ws, config=config, residual=residual)
    ref = residual_before.double() + fp8_linear_reference(x, wq, ws).double()
    assert rel_err(residual, ref) < 3e-2, f"+ residual: {rel_err(residual, ref):.3g}, seed={seed}"

    out = fp8_fused_gemv(x, wq, ws, config=config, norm_weight=norm_w, eps=eps, silu_mul=True)
    ref = silu_and_mul(fp8_linear_reference(rms_norm(x, norm_w, eps), wq, ws))
    assert out.shape == (1, n) and rel_err(out, ref) < 3e-2, f"+ norm + silu_mul, seed={seed}"


def test_fp8_fused_gemv_quantizes_the_normed_row(seed):
    """Quantizing x before the norm is wrong by FP8 rounding (a few percent), far outside the bound."""
    k, n = 512, 64
    x = torch.randn(1, k, device=DEVICE) * torch.linspace(0.01, 10, k, device=DEVICE)
    norm_w = torch.linspace(10, 0.01, k, device=DEVICE)  # the norm reshapes the row's magnitudes
    wq, ws = random_weight(n, k)
    normed_then_quantized = fp8_linear_reference(rms_norm(x, norm_w, 1e-6), wq, ws)
    for config in FUSED_CANDIDATES[0], next(c for c in FUSED_CANDIDATES if c.tensor_cores):
        out = fp8_fused_gemv(x, wq, ws, config=config, norm_weight=norm_w, eps=1e-6)
        assert rel_err(out, normed_then_quantized) < 2e-3, f"{config}, seed={seed}"
    xq, x_scale = quantize_per_token(x)
    quantized_then_normed = fp8_linear_reference(rms_norm(xq.float() * x_scale, norm_w, 1e-6), wq, ws)
    assert rel_err(quantized_then_normed, normed_then_quantized) > 1e-2, "the test cannot tell them apart"


# ---- torch._scaled_mm ------------------------------------------------------------------------------


def _scaled_mm_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _scaled_mm_supported(), reason="torch._scaled_mm needs a CUDA GPU of sm89 or later")
@pytest.mark.parametrize("m", [1, 16, 33, 256])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_linear(m, bias, static, seed):
    n, k = 96, 160  # multiples of 16, as torch._scaled_mm needs
    dtype = torch.bfloat16
    x = random_x(m, k, dtype)
    wq, ws = random_weight(n, k)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    input_scale = torch.tensor(0.02, device=DEVICE) if static else None
    out = scaled_mm_linear(x, wq, ws, b, input_scale)
    assert_matches(out, exact_product(x, wq, ws, b, input_scale), dtype, f"scaled_mm m={m}", seed)
