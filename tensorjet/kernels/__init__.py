"""Triton GPU kernels (paged-KV attention, KV-cache writes, the linear products, the fused decode layer)
and the PyTorch references they are tested against.

A kernel module needs `triton`; the references of the quantized products (`fp8_reference`,
`int4_reference`), which a CPU runs, do not, and importing the package imports no module. Kernels know
tensors only: the attention backend that drives them per step is `tensorjet.layers.triton_attention`.
"""
