#!/usr/bin/env bash
# The side-effect demonstration (scripts/side_effect_demo.py; issue 27, item 5): plant sycophancy in a
# quarter of the demo's pairs, train the demo's stage on them without and with screen:, then one paired
# evaluation (quick check + side-effect report) of the clean, planted and screened adapters; one table,
# the targets met or not, OUT/side_effect_demo.json. Resumable: run it again after a kill.
#
#   bash scripts/side_effect_demo.sh                      # recipes/demo.yaml (distill), -> runs/demo/side_effect_demo
#   bash scripts/side_effect_demo.sh --stage dpo -o runs/demo/side_effect_demo_dpo
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/python scripts/side_effect_demo.py "$@"
