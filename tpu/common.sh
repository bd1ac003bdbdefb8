#!/usr/bin/env bash
# Shared settings of the TPU VM scripts. Override any of them in the environment:
#   TPU_NAME=my-v4 ZONE=us-central2-b ACCELERATOR=v4-32 bash tpu/create.sh
set -euo pipefail
: "${TPU_NAME:=scalign-tpu}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-8}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${REMOTE_DIR:=scalign}"
: "${JAX_TPU_SPEC:=jax[tpu]==0.10.2}"

if [[ -z "${PROJECT}" ]]; then
  echo "error: no gcloud project; run 'gcloud config set project ID' or set PROJECT" >&2
  exit 2
fi

tpu_ssh() {  # tpu_ssh WORKER COMMAND  (WORKER: all | 0 | 1 ...)
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker="$1" --command="$2"
}
