#!/usr/bin/env bash
# One-GPU acceptance check (scripts/gpu_check.py): carried wheels installed offline where packages
# are missing, the training benchmark at 1.2B and 8B shapes, a distill and a dpo stage through
# `character-training train`, distill through the launch path; one table, one JSON.
#
#   bash scripts/gpu_check.sh --wheels wheels/          # one H100/H200, <= 8 minutes
#   bash scripts/gpu_check.sh --tiny                    # the same, scaled down, on the CPU
#
# Python: the repository's .venv where there is one, else the machine's python3 (a GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
exec "$python" scripts/gpu_check.py "$@"
