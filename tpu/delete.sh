#!/usr/bin/env bash
# Delete the TPU VM (or, with --queued, the queued resource and its TPU VM).
#   bash tpu/delete.sh --name=e2h --zone=us-west4-a [--queued]
# Options: see tpu/common.sh (--dry-run prints the gcloud command).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_common "$@"
if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "${TPU_NAME}" --zone="${ZONE}" \
    --project="${PROJECT}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --quiet
fi
