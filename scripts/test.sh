#!/usr/bin/env bash
# The tests: set up (first run only), then pytest, offline. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not integration"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
