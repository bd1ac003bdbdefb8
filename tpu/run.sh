#!/usr/bin/env bash
# Run the launcher on every worker of the slice (one JAX process per worker; on TPU VMs JAX
# finds the coordinator itself). The workdir must be shared by all workers: a gs:// path.
#   bash tpu/run.sh experiments/configs/e2h_llemma7b_prm800k.py gs://BUCKET/runs/e2h \
#     --name=e2h --zone=us-west4-a [--resume] [--config.key=value ...]
# Each worker logs to ~/scalign-<run>.log (tpu/logs.sh). A preempted run (SIGTERM) saves, prints
# "preempted: ...; resume with: ..." and exits 0; rerun this script with --resume.
# Options: see tpu/common.sh (--dry-run prints the gcloud command).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_common "$@"
if [[ ${#ARGS[@]} -lt 2 ]]; then
  echo "usage: $0 CONFIG gs://BUCKET/WORKDIR [--resume] [--config.key=value ...] [options]" >&2
  exit 2
fi
CONFIG="${ARGS[0]}"
WORKDIR="${ARGS[1]}"
if [[ "${WORKDIR}" != gs://* ]]; then
  echo "error: WORKDIR must be a gs:// path shared by every worker, got ${WORKDIR}" >&2
  exit 2
fi
LAUNCH_FLAGS=""
for flag in "${ARGS[@]:2}"; do
  LAUNCH_FLAGS+=" $(printf '%q' "${flag}")"
done
RUN_NAME="$(basename "${WORKDIR}")"
tpu_ssh all "cd ~/${REMOTE_DIR} && SCALIGN_DISTRIBUTED=1 nohup .venv/bin/python \
experiments/launch.py --config=${CONFIG} --workdir=${WORKDIR}${LAUNCH_FLAGS} \
> ~/scalign-${RUN_NAME}.log 2>&1 < /dev/null &"
echo "started ${RUN_NAME} on ${TPU_NAME}; follow it with: bash tpu/logs.sh ${RUN_NAME} --name=${TPU_NAME} --zone=${ZONE}"
