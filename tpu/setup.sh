#!/usr/bin/env bash
# Copy this checkout to every worker and install it (jax[tpu] + the pinned requirements).
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tar --exclude=.venv --exclude=runs --exclude=.git --exclude=.pytest_cache -czf /tmp/scalign.tgz \
  -C "${ROOT}" .
gcloud compute tpus tpu-vm scp /tmp/scalign.tgz "${TPU_NAME}:~/scalign.tgz" --zone="${ZONE}" \
  --project="${PROJECT}" --worker=all
tpu_ssh all "set -e; mkdir -p ${REMOTE_DIR} && tar -xzf ~/scalign.tgz -C ${REMOTE_DIR} && \
  cd ${REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
  .venv/bin/pip install -q '${JAX_TPU_SPEC}' && \
  grep -v -E '^(jax|jaxlib)==' requirements.txt > /tmp/req-tpu.txt && \
  .venv/bin/pip install -q -r /tmp/req-tpu.txt && .venv/bin/pip install -q --no-deps -e . && \
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0])'"
