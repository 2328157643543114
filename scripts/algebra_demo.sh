#!/usr/bin/env bash
# Persona algebra on two demo personas (issue 15): does A+B carry both personas, -A remove one,
# 0.5A half of one, A orthogonalized against B leave B alone? Captain Marlow (recipes/demo.yaml)
# and Wren the stoic gardener (recipes/gardener.yaml, the demo's settings) are each trained as the
# demo trains them (without their quick checks); then every composed, scaled, negated and
# orthogonalized adapter answers the same prompts. The report: runs/algebra/algebra.md (numbers
# in algebra.json, plots beside it).
# Finished stages are skipped and the algebra resumes from its caches, so a rerun goes on where a
# killed one stopped. Extra arguments go to `character-training algebra`, e.g.
#   bash scripts/algebra_demo.sh --set eval.samples_per_prompt=2 --set eval.persona_vectors=false
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
ct=.venv/bin/character-training

# Each persona's own quick check (its eval stage) is left out: the report has its adapter, its
# system prompt and the base model among its conditions, on more prompts.
# 1. Persona A: Captain Marlow (prompts -> pairs -> distillation), as the demo trains him.
"$ct" run recipes/demo.yaml --set 'stages=[prompts,pairs,distill]'
# 2. Persona B: Wren the stoic gardener, the same stages and settings.
"$ct" run recipes/gardener.yaml --set 'stages=[prompts,pairs,distill]'
# 3. The algebra of their final adapters (whichever stage trained each last), on the same prompts.
exec "$ct" algebra --persona recipes/demo.yaml --persona recipes/gardener.yaml -o runs/algebra "$@"
