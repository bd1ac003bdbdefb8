#!/usr/bin/env bash
# Shared by the tpu/*.sh scripts: options, defaults, and the one place gcloud is called.
#
# Every script accepts these options (defaults from the environment, then the values below):
#   --name=NAME            TPU VM / slice name            ($TPU_NAME,        scalign-tpu)
#   --zone=ZONE            e.g. us-west4-a, us-east5-a    ($ZONE,            us-west4-a)
#   --project=ID           gcloud project                 ($PROJECT,         gcloud's default)
#   --accelerator=TYPE     e.g. v5litepod-16, v5p-8       ($ACCELERATOR,     v5litepod-16)
#   --runtime=VERSION      TPU VM image                   ($RUNTIME_VERSION, by accelerator)
#   --spot                 spot capacity (cheap, can be reclaimed: see tpu/README.md)
#   --queued               a queued resource (waits for capacity) instead of a plain TPU VM
#   --dry-run              print every command instead of running it
# Positional arguments are left in ARGS.
set -euo pipefail

TPU_NAME="${TPU_NAME:-scalign-tpu}"
ZONE="${ZONE:-us-west4-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
REMOTE_DIR="${REMOTE_DIR:-scalign}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
DRY_RUN="${DRY_RUN:-0}"
ARGS=()

parse_common() {
  local arg
  for arg in "$@"; do
    case "${arg}" in
      --name=*) TPU_NAME="${arg#*=}" ;;
      --zone=*) ZONE="${arg#*=}" ;;
      --project=*) PROJECT="${arg#*=}" ;;
      --accelerator=*) ACCELERATOR="${arg#*=}" ;;
      --runtime=*) RUNTIME_VERSION="${arg#*=}" ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) ARGS+=("${arg}") ;;
    esac
  done
  if [[ -z "${RUNTIME_VERSION}" ]]; then
    case "${ACCELERATOR}" in
      v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
      v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
      v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
      *) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    esac
  fi
  if [[ -z "${PROJECT}" ]]; then
    if [[ "${DRY_RUN}" == "1" ]]; then
      PROJECT="PROJECT"
    else
      PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
    fi
  fi
  if [[ -z "${PROJECT}" ]]; then
    echo "error: no gcloud project; run 'gcloud config set project ID' or pass --project=ID" >&2
    exit 2
  fi
}

# run CMD ARGS...: run a command, or print it (shell-quoted, one line) with --dry-run.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    local arg line="" q="'"
    for arg in "$@"; do
      if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
        line+=" ${arg}"
      else
        line+=" '${arg//${q}/${q}\\${q}${q}}'"
      fi
    done
    echo "${line# }"
  else
    "$@"
  fi
}

# tpu_ssh WORKER COMMAND: run COMMAND on one worker (0, 1, ...) or on all of them.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker="$1" --command="$2"
}

# the jax version pinned in requirements.txt (jax[tpu] must match it)
pinned_jax() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  sed -n 's/^jax==\([0-9.]*\).*/\1/p' "${root}/requirements.txt"
}
