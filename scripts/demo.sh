#!/usr/bin/env bash
# The main job: set up (first run only), then the demo recipe on the packaged default model.
# Extra arguments go to `character-training run`, e.g. `bash scripts/demo.sh --force dpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/character-training run recipes/demo.yaml "$@"
