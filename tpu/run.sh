#!/usr/bin/env bash
# Run an experiment on every worker of the slice (all processes run the same command; JAX
# finds the coordinator itself on TPU VMs). Logs go to ~/scalign-<run>.log on each worker.
#   bash tpu/run.sh experiments/configs/e2h_llemma7b_prm800k.py gs://BUCKET/runs/e2h [--config.x=y ...]
source "$(dirname "$0")/common.sh"
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [launcher flags...]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
RUN="$(basename "${WORKDIR}")"
FLAGS="$*"
tpu_ssh all "cd ${REMOTE_DIR} && SCALIGN_DISTRIBUTED=1 nohup .venv/bin/python experiments/launch.py \
  --config=${CONFIG} --workdir=${WORKDIR} ${FLAGS} > ~/scalign-${RUN}.log 2>&1 &"
echo "started ${RUN} on ${TPU_NAME}; follow with: bash tpu/logs.sh ${RUN}"
