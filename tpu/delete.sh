#!/usr/bin/env bash
# Delete the TPU VM.
source "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" --quiet
