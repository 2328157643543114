#!/usr/bin/env bash
# One training stage on several processes: every process runs `character-training train KIND ...`,
# the TRL trainer shares the work, rank 0 writes the manifest, plot and model card. The adapter
# directory is the same as a one-process run's.
#
#   bash scripts/launch.sh CONFIG PROCS_PER_MACHINE KIND TRAIN_ARGS...
#
#   CONFIG  ddp | zero2 | zero3   GPUs: `accelerate launch` with scripts/accelerate/CONFIG.yaml
#           cpu                   the CPU: `torchrun` (gloo); `accelerate launch --cpu` starts
#                                 only one process. DeepSpeed on the CPU: add
#                                 --set trainer.deepspeed=scripts/deepspeed/zero2.json
#   KIND    dpo | sft | lm (see `character-training train --help`)
#
# One process needs no launcher:
#   character-training train dpo --data pairs.jsonl -o out/dpo
# 8 GPUs on one machine, DeepSpeed ZeRO-2; the line it runs:
#   bash scripts/launch.sh zero2 8 dpo --data pairs.jsonl -o out/dpo
#   accelerate launch --config_file scripts/accelerate/zero2.yaml --num_processes 8 --num_machines 1 \
#     --machine_rank 0 -m character_training.cli train dpo --data pairs.jsonl -o out/dpo
# 2 CPU processes:
#   bash scripts/launch.sh cpu 2 dpo --data pairs.jsonl -o out/dpo --set trainer.max_steps=2
# Several machines: run the same line on each machine with these set (scripts/slurm/train.sbatch
# does it under SLURM); --num_processes is then the total over all machines:
#   NUM_MACHINES=2 MACHINE_RANK=0|1 MAIN_PROCESS_IP=<rank 0's address> [MAIN_PROCESS_PORT=29500]
#   bash scripts/launch.sh zero3 8 sft --data conversations.jsonl -o out/sft
#   -> accelerate launch ... --num_processes 16 --num_machines 2 --machine_rank 1 \
#        --main_process_ip 10.0.0.1 --main_process_port 29500 -m character_training.cli train sft ...
# Every machine must see the same paths (shared storage) for data, model and output directory.
# A recipe's `launch:` section runs each training stage this way itself (run/launch.py builds both).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 3 ]] || usage
config=$1 procs=$2 kind=$3
shift 3
[[ $procs =~ ^[1-9][0-9]*$ ]] || { echo "error: PROCS_PER_MACHINE must be a positive number, got '$procs'" >&2; exit 2; }
machines=${NUM_MACHINES:-1} rank=${MACHINE_RANK:-0} port=${MAIN_PROCESS_PORT:-29500}
if [[ $machines -gt 1 && -z ${MAIN_PROCESS_IP:-} ]]; then
  echo "error: NUM_MACHINES=$machines needs MAIN_PROCESS_IP (the address of the machine with MACHINE_RANK=0)" >&2
  exit 2
fi
[[ -d .venv/bin ]] && export PATH="$PWD/.venv/bin:$PATH"

# The launcher line comes from character_training/run/launch.py, which also builds the one a
# recipe's `launch` section runs: one place says how each config is launched.
[[ $config == cpu ]] && export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # DeepSpeed would probe for accelerators
python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
where=(--machines "$machines" --machine-rank "$rank" --main-process-port "$port")
[[ -n ${MAIN_PROCESS_IP:-} ]] && where+=(--main-process-ip "$MAIN_PROCESS_IP")
line=$(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -m character_training.run.launch --print \
         "$config" "$procs" "${where[@]}" -- -m character_training.cli train "$kind" "$@") || exit 2
eval "cmd=($line)"  # shlex-quoted words

if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
