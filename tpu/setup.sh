#!/usr/bin/env bash
# Copy this checkout to every worker and install it there: jax[tpu] matching the jax pinned in
# requirements.txt, then the other requirements, then scalign itself (editable).
#   bash tpu/setup.sh --name=e2h --zone=us-west4-a
# Options: see tpu/common.sh (--dry-run prints the commands).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_common "$@"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
JAX_VERSION="$(pinned_jax)"
if [[ -z "${JAX_VERSION}" ]]; then
  echo "error: no 'jax==X' pin in ${ROOT}/requirements.txt" >&2
  exit 2
fi
TARBALL="${TMPDIR:-/tmp}/scalign-${TPU_NAME}.tgz"
run tar --exclude=.venv --exclude=runs --exclude=.git --exclude=.pytest_cache \
  --exclude=.cache -czf "${TARBALL}" -C "${ROOT}" .
run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU_NAME}:~/scalign.tgz" --zone="${ZONE}" \
  --project="${PROJECT}" --worker=all
tpu_ssh all "set -e; rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && \
tar -xzf ~/scalign.tgz -C ~/${REMOTE_DIR} && cd ~/${REMOTE_DIR} && \
python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
.venv/bin/pip install -q 'jax[tpu]==${JAX_VERSION}' && \
grep -v -E '^(jax|jaxlib)==' requirements.txt > /tmp/scalign-req-tpu.txt && \
.venv/bin/pip install -q -r /tmp/scalign-req-tpu.txt && .venv/bin/pip install -q --no-deps -e . && \
.venv/bin/python -c 'import jax; print(jax.__version__, jax.device_count(), jax.devices()[0])'"
