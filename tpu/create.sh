#!/usr/bin/env bash
# Create a TPU VM (slice). SPOT=1 asks for a spot VM.
source "$(dirname "$0")/common.sh"
extra=()
[[ "${SPOT:-0}" == "1" ]] && extra+=(--spot)
gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
  --accelerator-type="${ACCELERATOR}" --version="${RUNTIME_VERSION}" "${extra[@]}"
