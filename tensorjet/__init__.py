"""tensorjet: a readable, fast LLM inference engine.

The public names load lazily so that importing one submodule (or the CLI's --help) stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tensorjet.llm",
    "SamplingParams": "tensorjet.sampling_params",
    "RequestOutput": "tensorjet.outputs",
    "CompletionOutput": "tensorjet.outputs",
    "RequestMetrics": "tensorjet.outputs",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tensorjet' has no attribute {name!r}")
