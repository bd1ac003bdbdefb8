#!/usr/bin/env bash
# Create a TPU VM slice: a plain TPU VM, or (--queued) a queued resource that waits for capacity.
#   bash tpu/create.sh --name=e2h --accelerator=v5litepod-16 --zone=us-west4-a --spot
#   bash tpu/create.sh --name=ppo --accelerator=v5p-8 --zone=us-east5-a --queued --spot
# Options: see tpu/common.sh (--dry-run prints the gcloud command).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_common "$@"
extra=()
[[ "${SPOT}" == "1" ]] && extra+=(--spot)
if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources create "${TPU_NAME}" --node-id="${TPU_NAME}" \
    --zone="${ZONE}" --project="${PROJECT}" --accelerator-type="${ACCELERATOR}" \
    --runtime-version="${RUNTIME_VERSION}" "${extra[@]}"
  echo "queued ${TPU_NAME}; watch it with:" \
    "gcloud compute tpus queued-resources describe ${TPU_NAME} --zone=${ZONE} --project=${PROJECT}"
else
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --accelerator-type="${ACCELERATOR}" --version="${RUNTIME_VERSION}" "${extra[@]}"
fi
