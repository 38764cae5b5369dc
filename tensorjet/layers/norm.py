import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        # A fused kernel with the same numerics (`tensorjet.kernels.norm.rms_norm`), set by the runner
        # on the Triton path: one launch instead of about seven.
        self.kernel = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, returns (norm(x + residual), x + residual): the fused pre-norm pattern."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:
            # One fused op; the same bits as the spelled-out formula below (HF's) in fp32.
            out = torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)
