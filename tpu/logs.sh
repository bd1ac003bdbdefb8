#!/usr/bin/env bash
# Follow a run's log on one worker (default 0; --worker=all prints every worker's tail once).
#   bash tpu/logs.sh RUN --name=e2h --zone=us-west4-a [--worker=1]
# Options: see tpu/common.sh (--dry-run prints the gcloud command).
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
WORKER=0
rest=()
for arg in "$@"; do
  case "${arg}" in
    --worker=*) WORKER="${arg#*=}" ;;
    *) rest+=("${arg}") ;;
  esac
done
parse_common "${rest[@]}"
if [[ ${#ARGS[@]} -lt 1 ]]; then
  echo "usage: $0 RUN [--worker=N|all] [options]" >&2
  exit 2
fi
if [[ "${WORKER}" == "all" ]]; then
  tpu_ssh all "echo == \$(hostname); tail -n 20 ~/scalign-${ARGS[0]}.log"
else
  tpu_ssh "${WORKER}" "tail -n 50 -f ~/scalign-${ARGS[0]}.log"
fi
