"""INT4 calibration in the engine: round-to-nearest, AWQ and GPTQ over the engine's own model code,
layer by layer, written as AutoAWQ GEMM or GPTQ checkpoints (`tensorjet quantize`), or made and cached
as a float checkpoint loads with `quantization="awq"` / `"gptq"`.

- `quantizer`: the INT4 grid (group-wise scales and zero points) and round-to-nearest;
- `gptq`, `awq`: the two algorithms, on tensors;
- `layerwise`: the engine's model run one decoder layer at a time over the calibration samples;
- `pipeline`: each method applied layer by layer;
- `data`: the calibration samples, from the text shipped in the package or a file;
- `checkpoint`: the quantized model written in the AWQ or GPTQ format;
- `quantize`: model in, checkpoint out; `at_load`: the same as a model loads, cached;
- `cli`: `tensorjet quantize`.
"""
