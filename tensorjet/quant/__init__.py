"""Quantized weight formats: each a `LinearMethod` (`fp8`), and which one a model runs (`formats`)."""
