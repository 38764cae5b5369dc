"""Linear layers with a pluggable weight format.

A `LinearMethod` owns how a layer's weights are stored and multiplied. Unquantized bf16/fp32 is the
only method today; FP8 and INT4 slot in as further methods without touching the model code.
Merged layers (q|k|v, gate|up) keep one weight and load each checkpoint shard into its rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorjet.layers.norm import RMSNorm


class LinearMethod:
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def load_shard(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        out_features = sum(layer.output_sizes)
        layer.weight = nn.Parameter(
            torch.empty(out_features, layer.input_size, dtype=dtype), requires_grad=False
        )
        if layer.has_bias:
            layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)

    def load_shard(self, layer: Linear, name: str, shard: int, tensor: torch.Tensor) -> None:
        param = layer.weight if name == "weight" else layer.bias
        start = sum(layer.output_sizes[:shard])
        rows = param.data[start : start + layer.output_sizes[shard]]
        if rows.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name} shard {shard} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(rows.shape)}"
            )
        rows.copy_(tensor)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.small_batch_kernel is not None and x.shape[0] <= layer.small_batch_max_rows:
            return layer.small_batch_kernel(x, layer.weight, layer.bias)
        return layer.kernel(x, layer.weight, layer.bias)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` through oneDNN's matmul instead of MKL's sgemm; CPU only, same weight layout.

    Measured on the 2-core AMD EPYC VM, fp32 SmolLM2-135M: a batch-1 decode step 57 -> 38 ms, a
    32-row one 164 -> 122 ms, prefill products equal or a little faster. The sums round differently
    from MKL's (a few ulps), so logits are close to, not bit-identical with, HF's `F.linear`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Module):
    """y = x W^T (+ b), W made of `output_sizes` row blocks that load from separate checkpoint tensors."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.has_bias = bias
        self.bias = None
        self.method = method or UnquantizedLinearMethod()
        # A decode GEMV for up to `small_batch_max_rows` rows, set by the runner where it measured
        # faster than cuBLAS for this weight shape (`tensorjet.kernels.gemv.select_gemv`).
        self.small_batch_kernel = None
        self.small_batch_max_rows = 0
        # The batch-1 GEMV with this layer's neighbouring ops fused in
        # (`tensorjet.kernels.fused_gemv.fused_gemv`), set where it pays; see `forward_fused`.
        self.fused_gemv = None
        self.kernel = F.linear  # the product for every other batch; `onednn_linear` on CPU fp32
        self.method.create_weights(self, dtype)

    def load_shard(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        self.method.load_shard(self, name, shard, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def forward_fused(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        residual: torch.Tensor | None = None,
        act=None,
    ) -> torch.Tensor:
        """This layer's product for one row with the ops around it: `norm` applied to x first, the
        result added into `residual` in place (and returned), or `act` (SiLU-and-multiply of a
        [gate; up] layer) applied to it. With a fused GEMV they run inside it; without one, as
        separate ops around `forward`."""
        if self.fused_gemv is not None:
            return self.fused_gemv(
                x,
                self.weight,
                self.bias,
                norm_weight=None if norm is None else norm.weight,
                eps=0.0 if norm is None else norm.eps,
                residual=residual,
                silu_mul=act is not None,
            )
        y = self(x if norm is None else norm(x))
        if act is not None:
            return act(y)
        return y if residual is None else residual.add_(y)
