#!/usr/bin/env bash
# Tail worker 0's log of a run started by tpu/run.sh:  bash tpu/logs.sh RUN [WORKER]
source "$(dirname "$0")/common.sh"
tpu_ssh "${2:-0}" "tail -n 50 -f ~/scalign-$1.log"
